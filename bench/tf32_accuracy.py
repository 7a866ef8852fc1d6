"""How far float32 and TF32 arithmetic on the GPU land from float64, on the example network.

    python -m bench.tf32_accuracy [--tf32] [--batch B]

One forward and backward pass of the example network (seeded weights, random images, steps and
output projection) in float64, then in float32 on the same inputs: ``out`` and every parameter
gradient compared as ||a - b|| / ||b||. With ``--tf32`` the float32 pass uses TF32 tensor cores
for its matrix products (CUPY_TF32=1; CuPy reads it at its first float32 product, so the mode
is chosen once per process). Prints one line of JSON.
"""

import argparse
import json
import os

import numpy as np


def relative_error(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def forward_backward(model, x, t, projection):
    model.zero_grad()
    out = model(x, t)
    model.backward(projection)
    return out, {name: p.grad for name, p in model.parameters().items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    if args.tf32:
        os.environ["CUPY_TF32"] = "1"

    from tinyddpm.backend import array_module, to_host
    from tinyddpm.unet import UNet, preset

    xp = array_module("gpu")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 32, 32, 1))
    t = rng.integers(1, 501, size=args.batch)
    projection = rng.standard_normal(x.shape)
    results = {}
    for dtype in (np.float64, np.float32):
        model = UNet(preset("example"), rng=np.random.default_rng(1), dtype=dtype).to(xp)
        out, grads = forward_backward(model, xp.asarray(x, dtype=dtype), t, xp.asarray(projection, dtype=dtype))
        results[dtype] = to_host(out), {name: to_host(g) for name, g in grads.items()}
    (out64, grads64), (out32, grads32) = results[np.float64], results[np.float32]
    # The attention key biases have a zero gradient in exact arithmetic (rounding noise only).
    errors = [relative_error(grads32[n], grads64[n]) for n in grads64 if not n.endswith(".k.bias")]
    print(json.dumps({"mode": "tf32" if args.tf32 else "float32", "batch": args.batch,
                      "out_rel_err": relative_error(out32, out64),
                      "grad_rel_err_median": float(np.median(errors)), "grad_rel_err_max": max(errors)}))


if __name__ == "__main__":
    main()
