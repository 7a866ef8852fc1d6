"""Where a tinyddpm training or sampling step spends its time, layer by layer.

    python -m bench.profile_layers [--device cpu|gpu] [--phase train|sample] [--batch B]
                                   [--steps N] [--threads N] [--out bench/results/NAME.json]

One training step of the example network (float32, batch 128 by default) after one warm-up
step, or with ``--phase sample`` one sampler forward pass (``no_grad``, all steps inside one
``frozen_weights()`` block, as ``sample()`` runs them); both inside one ``array_cache()``
block, as ``train()`` and ``sample()`` run. The sampler itself splits its batch over the
threads (``parallel.map_batch``); the profile instead runs the pass layer by layer on all
threads, as a training step runs, so that each layer's time is its own.

Every Module *instance* of the network (and the loss) gets its ``forward`` and ``backward``
wrapped by a timer stored as an instance attribute, which shadows the class's method for that
object only: nothing is patched at module or class level, and the wrappers go away with the
model. Calls nest (a residual block calls its convs), so each record keeps both
the inclusive time and the exclusive ("self") time, the inclusive time minus that of the timed
calls made inside it. Summing the self times over all instances gives the model's total
without counting anything twice; what is left of the step (q_sample, zero_grad, Python glue) is
reported as "other". On the GPU every timer synchronises the device first, so the per-layer
times are honest but the total is a little slower than an unprofiled step.

Tables printed:
- per layer type: instances, forward and backward self seconds, share of the step;
- per block (the network's top-level children, r1 .. r14, a3 .., conv_in, ...): inclusive
  forward and backward seconds;
- the 15 instances with the largest self time (forward + backward).
"""

import argparse
import contextlib
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from tinyddpm.backend import array_module
from tinyddpm.diffusion import linear_schedule
from tinyddpm.nn import Module, MSELoss, array_cache, frozen_weights, no_grad
from tinyddpm.optim import Adam
from tinyddpm.train import train_step
from tinyddpm.unet import UNet, preset


def named_modules(module, prefix=""):
    """``(dotted_name, module)`` for ``module`` and every Module below it, parents first."""
    yield prefix.rstrip(".") or "<root>", module
    for name, value in vars(module).items():
        if isinstance(value, Module):
            yield from named_modules(value, prefix + name + ".")


class LayerTimer:
    """Times every forward/backward call of the instances it is installed on."""

    def __init__(self, sync):
        self.sync = sync
        self.records = defaultdict(lambda: {"calls": 0, "total": 0.0, "self": 0.0})
        self.kinds = {}
        self._children = []  # per open call: the time spent in timed calls made inside it

    def install(self, module, prefix=""):
        for name, sub in named_modules(module, prefix):
            self.kinds[name] = type(sub).__name__
            for phase in ("forward", "backward"):
                setattr(sub, phase, self._wrap(getattr(sub, phase), name, phase))

    def time_call(self, name, phase, fn, *args, **kwargs):
        """Time ``fn(*args, **kwargs)`` as the record ``(name, phase)``."""
        self.sync()
        start = time.perf_counter()
        self._children.append(0.0)
        try:
            return fn(*args, **kwargs)
        finally:
            self.sync()
            elapsed = time.perf_counter() - start
            inner = self._children.pop()
            if self._children:
                self._children[-1] += elapsed
            record = self.records[name, phase]
            record["calls"] += 1
            record["total"] += elapsed
            record["self"] += elapsed - inner

    def _wrap(self, method, name, phase):
        def timed(*args, **kwargs):
            return self.time_call(name, phase, method, *args, **kwargs)

        return timed

    def reset(self):
        self.records.clear()


def profile(device, phase, batch, steps):
    xp = array_module(device)
    sync = (lambda: xp.cuda.Device().synchronize()) if xp is not np else (lambda: None)
    model = UNet(preset("example"), rng=np.random.default_rng(0), dtype=np.float32).to(xp)
    optimizer = Adam(model.parameters(), lr=5e-4)
    loss_fn = MSELoss()
    schedule = linear_schedule()
    rng = np.random.default_rng(0)
    x0 = xp.asarray(rng.uniform(-1, 1, (batch, 32, 32, 1)).astype(np.float32))
    t = rng.integers(1, 501, size=batch)
    noise = xp.asarray(rng.standard_normal(x0.shape, dtype=np.float32))

    timer = LayerTimer(sync)
    timer.install(model, "unet.")
    timer.install(loss_fn, "loss.")
    optimizer.step = timer._wrap(optimizer.step, "adam", "step")  # an instance attribute too
    model.zero_grad = timer._wrap(model.zero_grad, "zero_grad", "step")

    def one_step():
        if phase == "sample":
            with no_grad():
                return timer.time_call("step", "step", model, noise, t)
        return timer.time_call("step", "step", train_step, model, optimizer, loss_fn, schedule, x0, t, noise)

    with array_cache(), frozen_weights() if phase == "sample" else contextlib.nullcontext():
        one_step()  # warm-up
        timer.reset()
        for _ in range(steps):
            one_step()
    return timer


def tables(timer, steps):
    """Per layer type, per block and top instances, in seconds per step."""
    records, kinds = timer.records, timer.kinds
    step_total = records["step", "step"]["total"] / steps

    def self_time(name, phase):
        return records[name, phase]["self"] / steps if (name, phase) in records else 0.0

    layers = [n for n in kinds if n.startswith(("unet", "loss"))]
    by_type = defaultdict(lambda: {"instances": 0, "forward": 0.0, "backward": 0.0})
    for name in layers:
        row = by_type[kinds[name] if name != "unet" else "UNet (glue)"]
        row["instances"] += 1
        row["forward"] += self_time(name, "forward")
        row["backward"] += self_time(name, "backward")
    for name, label in (("adam", "Adam.step"), ("zero_grad", "zero_grad")):
        by_type[label] = {"instances": 1, "forward": self_time(name, "step"), "backward": 0.0}
    accounted = sum(r["forward"] + r["backward"] for r in by_type.values())
    by_type["other (q_sample, glue)"] = {"instances": 0, "forward": step_total - accounted, "backward": 0.0}

    blocks = {}
    for name in layers:
        if name.count(".") == 1 and name.startswith("unet."):
            blocks[name[len("unet."):]] = {
                "type": kinds[name],
                "forward": records[name, "forward"]["total"] / steps if (name, "forward") in records else 0.0,
                "backward": records[name, "backward"]["total"] / steps if (name, "backward") in records else 0.0,
            }

    instances = sorted(
        ({"name": n, "type": kinds[n], "forward": self_time(n, "forward"),
          "backward": self_time(n, "backward")} for n in layers),
        key=lambda r: -(r["forward"] + r["backward"]))
    return step_total, dict(by_type), blocks, instances


def print_tables(phase, step_total, by_type, blocks, instances, top):
    def line(cells, widths):
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))))

    print(f"{'training step' if phase == 'train' else 'sampler forward pass'}: {step_total:.3f} s\n")
    widths = (25, 9, 10, 10, 10, 7)
    line(("layer type (self time)", "instances", "forward s", "backward s", "total s", "share"), widths)
    for kind, r in sorted(by_type.items(), key=lambda kv: -(kv[1]["forward"] + kv[1]["backward"])):
        total = r["forward"] + r["backward"]
        line((kind, r["instances"], f"{r['forward']:.3f}", f"{r['backward']:.3f}", f"{total:.3f}",
              f"{100 * total / step_total:.1f}%"), widths)

    print()
    widths = (8, 25, 10, 10, 10, 7)
    line(("block", "type", "forward s", "backward s", "total s", "share"), widths)
    for name, r in sorted(blocks.items(), key=lambda kv: -(kv[1]["forward"] + kv[1]["backward"])):
        total = r["forward"] + r["backward"]
        if total >= 0.0005 * step_total:
            line((name, r["type"], f"{r['forward']:.3f}", f"{r['backward']:.3f}", f"{total:.3f}",
                  f"{100 * total / step_total:.1f}%"), widths)

    print()
    widths = (26, 25, 10, 10, 10, 7)
    line((f"top {top} instances (self)", "type", "forward s", "backward s", "total s", "share"), widths)
    for r in instances[:top]:
        total = r["forward"] + r["backward"]
        line((r["name"], r["type"], f"{r['forward']:.3f}", f"{r['backward']:.3f}", f"{total:.3f}",
              f"{100 * total / step_total:.1f}%"), widths)


def add_step_arguments(parser, steps, top):
    """The options that say which step to profile and how, shared with ``profile_reference.py``."""
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--phase", choices=("train", "sample"), default="train",
                        help="a training step, or a sampler's forward pass (default train)")
    parser.add_argument("--batch", type=int, default=128, help="batch (default 128)")
    parser.add_argument("--steps", type=int, default=steps, help=f"profiled steps after the warm-up (default {steps})")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads: tinyddpm's chunks and BLAS, or torch's (default: os.cpu_count())")
    parser.add_argument("--top", type=int, default=15, help=f"{top} listed (default 15)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser, steps=1, top="instances")
    parser.add_argument("--out", help="JSON path (default bench/results/profile_layers_<device>.json)")
    args = parser.parse_args(argv)

    from threadpoolctl import threadpool_info

    from bench.bench_step import limit_threads

    limit_threads(args.threads, uses_torch=False)
    timer = profile(args.device, args.phase, args.batch, args.steps)
    step_total, by_type, blocks, instances = tables(timer, args.steps)
    print_tables(args.phase, step_total, by_type, blocks, instances, args.top)

    suffix = "" if args.phase == "train" else f"_sample_b{args.batch}"
    out = Path(args.out or f"bench/results/profile_layers_{args.device}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": {"device": args.device, "phase": args.phase, "batch": args.batch, "steps": args.steps,
                   "threads": args.threads, "network": "example", "dtype": "float32"},
        "blas": [{k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                 for lib in threadpool_info()],
        "step_seconds": step_total,
        "by_type": by_type,
        "by_block": blocks,
        "instances": instances,
        "raw": [{"name": n, "phase": p, **r} for (n, p), r in timer.records.items()],
    }, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
