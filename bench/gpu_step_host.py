"""How much of a GPU training step is the host's: queueing the kernels from Python, or waiting.

    python -m bench.gpu_step_host [--device gpu|cpu] [--batch B] [--steps N] [--out FILE.json]

Runs N training steps of the example network one at a time (after three warm-up steps). Each
step is split at the point where the benchmark's training step (``train.TrainStep``: on the GPU
it replays a CUDA graph, and ``TINYDDPM_CUDA_GRAPHS=0`` launches every kernel from Python) has
returned, its whole update queued, and the loss (left on the device) is read: *queue* is the
Python time up to there, *wait* the time the read then blocks for the GPU to finish. A step
whose wait is near zero is paced by the host: the GPU ran out of queued work. The steps run
twice, with Python's garbage collector on and then off, to show whether its pauses explain
slow steps. Prints a table (median and range of each part, in ms) and writes every time to
the JSON. On the CPU the queue is the whole step.
"""

import argparse
import gc
import json
import statistics
import time

from bench.bench_step import TinyddpmBench


def run_steps(device, batch, steps):
    """Per-step (queue, wait) seconds of ``steps`` steps, with and without the garbage collector."""
    bench = TinyddpmBench(device, batch)  # the benchmark's model, Adam, batch, inside array_cache()

    def step():
        start = time.perf_counter()
        loss = bench.train_step()
        queued = time.perf_counter()
        float(loss)
        return queued - start, time.perf_counter() - queued

    for _ in range(3):
        step()
    results = {}
    for label, collect in (("gc on", True), ("gc off", False)):
        if not collect:
            gc.collect()
            gc.disable()
        try:
            results[label] = [step() for _ in range(steps)]
        finally:
            gc.enable()
    return results


def describe(seconds):
    ms = [s * 1e3 for s in seconds]
    return f"{statistics.median(ms):.1f} ({min(ms):.1f}-{max(ms):.1f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", help="JSON path (default: none written)")
    args = parser.parse_args(argv)
    results = run_steps(args.device, args.batch, args.steps)
    print(f"{'steps':8s} {'queue ms':>22s} {'wait ms':>22s} {'step ms':>22s}")
    for label, times in results.items():
        queue, wait = zip(*times)
        print(f"{label:8s} {describe(queue):>22s} {describe(wait):>22s} "
              f"{describe([q + w for q, w in times]):>22s}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": args.device, "batch": args.batch,
                       "steps": {label: [{"queue_s": q, "wait_s": w} for q, w in times]
                                 for label, times in results.items()}}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
