"""Where a GPU convolution's time goes: the patch matrix, the products, and each pass.

    python -m bench.gpu_conv_parts [--runs 16 8 4]

For the example network's 3x3 convolutions at batch 128 (float32, CuPy), the median time of:
building ``cols`` through a padded copy and a strided view (the NumPy way), building it with
the one-kernel ``fused.im2col``, the forward product alone, and the whole forward, weight
gradient and input gradient. Prints a table; GFLOP/s are for the product's 2*M*K*N flops.
With ``--runs``, ``fused.im2col`` is also timed copying each of those channel runs a thread
(``fused.IM2COL_RUNS``), each checked against the strided copy.
"""

import time

import numpy as np


def median_seconds(fn, sync, repeats=20):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_runs(runs, shapes):
    """``fused.im2col`` with each channel run of ``runs``, checked against the strided copy."""
    import cupy

    from tinyddpm.nn import conv, fused

    sync = cupy.cuda.Device().synchronize
    rng = np.random.default_rng(1)
    kept = fused.IM2COL_RUNS
    print(f"{'H W C':>12} " + " ".join(f"{f'run {v}':>9}" for v in runs))
    try:
        for H, W, C, _ in shapes:
            x = cupy.asarray(rng.standard_normal((128, H, W, C), dtype=np.float32))
            padding = ((1, 1), (1, 1))
            strided = conv.im2col(conv.pad_hw(x, *padding), 3, 3, 1)
            times = []
            for v in runs:
                fused.IM2COL_RUNS = (v, 1)
                assert bool((fused.im2col(x, 3, 3, 1, padding) == strided).all()), f"run {v} differs"
                times.append(median_seconds(lambda: fused.im2col(x, 3, 3, 1, padding), sync))
            print(f"{H:>3} {W:>3} {C:>4} " + " ".join(f"{t * 1e3:>7.3f}ms" for t in times))
    finally:
        fused.IM2COL_RUNS = kept


def main(argv=None):
    import argparse

    import cupy

    from tinyddpm.nn import conv, fused

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="*", default=[], help="channel runs to time fused.im2col with")
    args = parser.parse_args(argv)
    sync = cupy.cuda.Device().synchronize
    shapes = [(32, 32, 64, 64), (32, 32, 128, 64), (16, 16, 128, 128), (8, 8, 256, 256)]
    rng = np.random.default_rng(0)
    print(f"{'H W C OC':>16} {'strided cols':>13} {'fused cols':>11} {'product':>9} {'GFLOP/s':>8} "
          f"{'forward':>9} {'dW':>9} {'dx':>9}")
    for H, W, C, OC in shapes:
        x = cupy.asarray(rng.standard_normal((128, H, W, C), dtype=np.float32))
        w = cupy.asarray(rng.standard_normal((OC, C, 3, 3), dtype=np.float32))
        dout = cupy.asarray(rng.standard_normal((128, H, W, OC), dtype=np.float32))
        padding = ((1, 1), (1, 1))
        w_matrix = cupy.ascontiguousarray(conv.weight_matrix(w))
        cols = fused.im2col(x, 3, 3, 1, padding)
        strided = conv.im2col(conv.pad_hw(x, *padding), 3, 3, 1)
        assert bool((strided == cols).all()), "fused im2col differs from the strided copy"
        times = [
            median_seconds(lambda: conv.im2col(conv.pad_hw(x, *padding), 3, 3, 1), sync),
            median_seconds(lambda: fused.im2col(x, 3, 3, 1, padding), sync),
            median_seconds(lambda: cols @ w_matrix, sync),
            median_seconds(lambda: conv.correlate(x, w, 1), sync),
            median_seconds(lambda: conv.correlate_weight_grad(x, dout, 3, 3, 1), sync),
            median_seconds(lambda: conv.correlate_input_grad(dout, w, x.shape, 1), sync),
        ]
        gflops = 2 * cols.shape[0] * cols.shape[1] * OC / times[2] / 1e9
        print(f"{H:>3} {W:>3} {C:>4} {OC:>4}  " + " ".join(f"{t * 1e3:>9.3f}ms" for t in times[:3])
              + f" {gflops:>8.0f} " + " ".join(f"{t * 1e3:>7.3f}ms" for t in times[3:]))
    if args.runs:
        time_runs(args.runs, shapes)


if __name__ == "__main__":
    main()
