"""Where the PyTorch reference spends a training or sampling step, operator by operator.

    python -m bench.profile_reference [--device cpu|gpu] [--phase train|sample] [--batch B]
                                      [--steps N] [--threads N] [--top N] [--out bench/results/NAME.json]

The counterpart of ``profile_layers.py`` for the reference (``bench/torch_reference.py``): the
same network, weights, batch and step as ``bench_step.py``'s rows, run under
``torch.profiler`` after one warm-up step. PyTorch's profiler times its own operators (aten
ops), not our layers, so the table is per operator: self time (the operator's own work, without
the operators it calls) in seconds per step, calls per step, and share of the step.
Read it next to ``profile_layers`` to see which kind of work (convolutions, normalisation and
activation, attention products) each implementation spends more on; the two profilers add
different overheads, so compare shares and the big rows, not totals to the millisecond.
"""

import argparse
import json
import sys
from pathlib import Path

from bench.profile_layers import add_step_arguments


def profile(device, phase, batch, steps):
    """``(seconds_per_step, rows)`` with rows ``{name, calls, self_seconds}`` per aten operator."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from bench.bench_step import TorchBench

    bench = TorchBench(device, batch)
    step = bench.train_step if phase == "train" else (lambda: bench.sample_step(batch))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "gpu" else [])
    step()  # warm-up
    bench.sync()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        bench.sync()
    rows = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if device == "gpu" else event.self_cpu_time_total
        rows.append({"name": event.key, "calls": event.count / steps, "self_seconds": self_us / 1e6 / steps})
    rows.sort(key=lambda r: r["self_seconds"], reverse=True)
    return sum(r["self_seconds"] for r in rows), rows


def print_table(phase, batch, total, rows, top):
    print(f"PyTorch reference, {phase} step at batch {batch}: {total:.3f} s of operator self time per step\n")
    print(f"{'operator':36s} {'calls':>7s} {'self s':>9s} {'share':>7s}")
    for r in rows[:top]:
        print(f"{r['name']:36s} {r['calls']:7.0f} {r['self_seconds']:9.3f} {r['self_seconds'] / total:7.1%}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser, steps=2, top="operators")
    parser.add_argument("--out", help="JSON path (default bench/results/profile_reference_<device>_<phase>_b<B>.json)")
    args = parser.parse_args(argv)

    from bench.bench_step import gpu_skip_reason, limit_threads, setup_gpu

    if args.device == "gpu":
        if reason := gpu_skip_reason():
            print(f"Error: {reason}", file=sys.stderr)
            return 1
        setup_gpu()  # plain float32, as bench_step times it
    limit_threads(args.threads, uses_torch=True)
    total, rows = profile(args.device, args.phase, args.batch, args.steps)
    print_table(args.phase, args.batch, total, rows, args.top)

    import torch

    out = Path(args.out or f"bench/results/profile_reference_{args.device}_{args.phase}_b{args.batch}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": {"device": args.device, "phase": args.phase, "batch": args.batch, "steps": args.steps,
                   "threads": args.threads, "torch": torch.__version__, "dtype": "float32"},
        "self_seconds_per_step": total,
        "operators": rows,
    }, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
