"""tinyddpm next to the PyTorch reference: the example's network, the same work, the same threads.

    python -m bench.bench_step [--device cpu|gpu] [--repeats N] [--min-row-seconds S] [--batch B] [--threads N]
                               [--allocator default|tuned] [--tf32] [--out bench/results/NAME.json]

Rows (the example network, float32):

- ``train step``: one training update at batch B (default 128, the example's): q_sample,
  forward, the MATLAB mse loss, backward, Adam. tinyddpm's ``train.TrainStep``, as ``train()``
  runs it (on the GPU it replays a CUDA graph of the update after the warm-up call), against
  the reference's ``train_step``.
- ``sample step``: one step of the ancestral sampler at batch 16 (the example's preview) and at
  batch B: a forward pass that keeps nothing for backward (``no_grad`` / ``torch.no_grad``)
  and the update to x_{t-1}; tinyddpm's forward is ``sampling.predict_noise``, as its sampler
  makes it (on the CPU the caller and a worker process each run the network on a slice of the
  batch; on the GPU it replays a CUDA graph). tinyddpm's steps run inside one
  ``frozen_weights()`` block, as ``sample()`` runs all of its steps, so each conv's filter
  transform (and on the GPU the graph) is made once, in the warm-up calls, and the timed calls
  measure a sampler's steady state.
- ``peak memory``: the extra peak memory of a training step (see below).

tinyddpm runs everything inside one ``array_cache()`` block (``nn/memory.py``), as ``train()``
and ``sample()`` run all of their steps: large arrays reuse the memory of dead ones.

Timing. Both implementations are built once, with the same weights and the same inputs. Each
row first runs two warm-up calls of each (a sampling run starts its worker processes on its
second pass: ``forward_workers.py``), then alternates tinyddpm, torch, tinyddpm, torch, ...
for ``--repeats`` rounds, and for more while the row has taken less than ``--min-row-seconds``
(so the cheap batch-16 sampling row gets some twenty rounds where a training row gets three),
so that whatever else the machine is doing (other tenants, clock changes) falls on both alike.
Every row reports the median and the min..max of its rounds; its ratio is the ratio of the two
medians, ``paired`` is the median of the rounds' own ratios, which a machine whose speed
drifts during the row moves less, and ``of mins`` the ratio of the two fastest rounds, the
nearest the row comes to a quiet machine (the two libraries need not lose alike to a busy
one). Both run on the same number of threads: ``torch.set_num_threads(n)`` and threadpoolctl's limit on every
BLAS/OpenMP pool loaded in the process (default n = ``os.cpu_count()`` on the CPU, 1 on the
GPU). On the GPU both libraries drive the device from one host thread, and more threads only
hurt: PyTorch's idle OpenMP threads spin after its step and slowed the next one of
tinyddpm's, whose step is paced by the host, from 73 to 103 ms (median of 50 on an H100 with 16
cores; PyTorch's own step stayed at 61-62 ms). On the GPU the clock is read only after
``cupy.cuda.Device().synchronize()`` / ``torch.cuda.synchronize()``.

Peak memory. Each implementation runs in a fresh subprocess that imports only what it needs,
reads its peak resident set size (``VmHWM`` from ``/proc/self/status``, or ``ru_maxrss`` where
there is no /proc), builds the model, optimiser and batch, runs a warm-up step and one more
step, and reads the peak again. The row is the difference: the high-water mark that the weights,
gradients, Adam moments, activations and the allocator's slack add on top of the imported
libraries. On the GPU the row is device memory instead, from each library's own allocator:
for CuPy the peak of the bytes handed out by its memory pool (tracked with a memory hook) and
the pool's final size; for PyTorch ``torch.cuda.max_memory_allocated()`` and
``max_memory_reserved()``.

Allocator. ``--allocator tuned`` runs the whole benchmark (both implementations, and the memory
subprocesses) under ``GLIBC_TUNABLES`` that keep freed memory in the process instead of
unmapping it; with glibc's defaults every large array is a fresh mmap whose pages fault in on
first touch. Run it both ways to compare each library with and without that cost.

TF32. On the GPU, ``--tf32`` lets both implementations' matrix products use TF32 tensor cores
(CUPY_TF32=1 for CuPy; allow_tf32 for PyTorch's matmuls and cuDNN); without it both run plain
float32.

The JSON (``--out``, default ``bench/results/bench_step_<device>[_tuned_malloc].json``) holds every raw time,
the ratios, and the environment: CPU model, threads, library versions, the BLAS that
threadpoolctl finds (internal_api, version, architecture), and the variables that change
allocator or BLAS behaviour (GLIBC_TUNABLES, OPENBLAS_CORETYPE, MALLOC_*).
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SAMPLE_STEP = 250  # the sampler step timed (the cost does not depend on it)
MAX_ROUNDS = 50  # per row, however short its calls
IMPLEMENTATIONS = ("tinyddpm", "torch")


# ---------------------------------------------------------------------------------------------
# The two implementations behind one small interface
# ---------------------------------------------------------------------------------------------


# glibc's mmap threshold and trim threshold set so that freed blocks are kept for reuse
# rather than returned to the kernel and faulted in again (the "tuned allocator").
TUNED_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def make_batch(batch, seed=0):
    """A training batch in tinyddpm's channels-last layout: x0 in [-1, 1], steps, noise."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, (batch, 32, 32, 1)).astype(np.float32)
    t = rng.integers(1, 501, size=batch)
    noise = rng.standard_normal(x0.shape, dtype=np.float32)
    return x0, t, noise


class TinyddpmBench:
    """tinyddpm's example network, Adam and sampler on NumPy (cpu) or CuPy (gpu)."""

    name = "tinyddpm"

    def __init__(self, device, batch, state=None):
        from tinyddpm.backend import array_module
        from tinyddpm.diffusion import linear_schedule
        from tinyddpm.nn import MSELoss, array_cache
        from tinyddpm.optim import Adam
        from tinyddpm.unet import UNet, preset

        self.xp = array_module(device)
        self.model = UNet(preset("example"), rng=np.random.default_rng(0), dtype=np.float32)
        if state is not None:
            self.model.load_state_dict(state)
        self.model.to(self.xp)
        self.optimizer = Adam(self.model.parameters(), lr=5e-4)
        self.loss_fn = MSELoss()
        self.schedule = linear_schedule()
        x0, self.t, noise = make_batch(batch)
        self.x0, self.noise = self.xp.asarray(x0), self.xp.asarray(noise)
        # The blocks train() and sample() run their steps in: array_cache() from here on, and
        # frozen_weights() from the first sample step, after the train rows.
        self.blocks = contextlib.ExitStack()
        self.blocks.enter_context(array_cache())
        self.frozen = False
        self.update = None  # the TrainStep, made on first use

    def sync(self):
        if self.xp is not np:
            self.xp.cuda.Device().synchronize()

    def train_step(self):
        if self.update is None:
            from tinyddpm.train import TrainStep

            self.update = TrainStep(self.model, self.optimizer, self.loss_fn, self.schedule)
        return self.update(self.x0, self.t, self.noise)

    def sample_step(self, batch):
        from tinyddpm.diffusion import ancestral_step
        from tinyddpm.nn import frozen_weights
        from tinyddpm.sampling import predict_noise

        if not self.frozen:
            self.blocks.enter_context(frozen_weights())
            self.frozen = True
        x, z = self.noise[:batch], self.x0[:batch]
        eps = predict_noise(self.model, x, SAMPLE_STEP)
        return ancestral_step(self.schedule, x, SAMPLE_STEP, eps, z)


class TorchBench:
    """The PyTorch reference (bench/torch_reference.py) on the CPU or CUDA, in NCHW."""

    name = "torch"

    def __init__(self, device, batch, state=None):
        import torch

        from bench import torch_reference as ref

        self.torch, self.ref = torch, ref
        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        self.model = ref.ReferenceUNet()
        if state is not None:
            ref.load_numpy_state(self.model, state)
        self.model.to(self.device, torch.float32)
        self.optimizer = ref.make_optimizer(self.model)
        self.schedule = ref.Schedule(*(a.to(self.device) for a in ref.make_schedule()))
        x0, t, noise = make_batch(batch)
        self.x0, self.noise = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).to(self.device)
                               for a in (x0, noise))
        self.t = torch.from_numpy(t).to(self.device)

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def train_step(self):
        self.ref.train_step(self.model, self.optimizer, self.x0, self.t, self.noise, self.schedule)

    def sample_step(self, batch):
        x, z = self.noise[:batch], self.x0[:batch]
        return self.ref.ancestral_step(self.model, x, SAMPLE_STEP, z, self.schedule)


BENCHES = {"tinyddpm": TinyddpmBench, "torch": TorchBench}


# ---------------------------------------------------------------------------------------------
# Threads, devices, environment
# ---------------------------------------------------------------------------------------------


def limit_threads(n, uses_torch):
    """The same thread count for every BLAS/OpenMP pool in the process, for torch's own pool,
    and for tinyddpm's chunk pool (which holds BLAS to one thread inside its chunks)."""
    from threadpoolctl import threadpool_limits

    from tinyddpm.nn import parallel

    parallel.THREADS = n
    if uses_torch:
        import torch

        torch.set_num_threads(n)
    return threadpool_limits(limits=n)  # applies now, for the life of the process


def gpu_skip_reason():
    """Why the GPU comparison cannot run here, or None."""
    from tinyddpm.backend import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is not None:
        return f"tinyddpm cannot use the GPU: {reason}"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has no usable CUDA device"
    return None


def setup_gpu(tf32=False):
    """The same arithmetic on both sides: plain float32 by default (CuPy does not use TF32
    unless CUPY_TF32=1, so neither may torch, whose convolutions would by default), or TF32
    tensor-core products on both with ``--tf32``."""
    import torch

    if tf32:
        os.environ["CUPY_TF32"] = "1"  # read by CuPy at its first float32 product
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device, threads):
    import threadpoolctl
    import torch

    keys = ("user_api", "internal_api", "prefix", "version", "architecture", "threading_layer",
            "num_threads", "filepath")
    env = {
        "cpu_model": cpu_model(),
        "os_cpu_count": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libc": " ".join(platform.libc_ver()),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threadpoolctl": threadpoolctl.__version__,
        "threadpools": [{k: lib.get(k) for k in keys} for lib in threadpoolctl.threadpool_info()],
        "env": {k: os.environ.get(k) for k in (
            "GLIBC_TUNABLES", "OPENBLAS_CORETYPE", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
            "MKL_NUM_THREADS", "LD_PRELOAD", "CUPY_TF32")},
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    if device == "gpu":
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        env.update({
            "gpu": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
            "cupy": cupy.__version__,
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "torch_cuda": torch.version.cuda,
            "torch_cudnn": torch.backends.cudnn.version(),
            "torch_allow_tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                 "cudnn": torch.backends.cudnn.allow_tf32},
        })
    return env


# ---------------------------------------------------------------------------------------------
# Peak memory, one implementation per subprocess
# ---------------------------------------------------------------------------------------------


def peak_rss_bytes():
    """The process's peak resident set size so far."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _cupy_peak_hook():
    """A CuPy memory hook that follows the bytes handed out by the pool and keeps their peak."""
    import cupy

    class PeakHook(cupy.cuda.MemoryHook):
        name = "PeakHook"

        def __init__(self):
            self.used = self.peak = 0

        def malloc_postprocess(self, **kw):
            self.used += kw["mem_size"]
            self.peak = max(self.peak, self.used)

        def free_postprocess(self, **kw):
            self.used -= kw["mem_size"]

    return PeakHook()


def memory_probe(impl, device, batch, threads):
    """Run in a subprocess: the extra peak memory of a warm-up and one training step."""
    limit_threads(threads, uses_torch=impl == "torch")
    if impl == "torch":
        import torch

        from bench import torch_reference  # noqa: F401  (imported before the baseline)
    else:
        import tinyddpm.train  # noqa: F401
    hook = None
    if device == "gpu":
        if impl == "torch":
            setup_gpu()
            torch.cuda.init()
            torch.cuda.reset_peak_memory_stats()
        else:
            import cupy

            cupy.cuda.Device().synchronize()
            hook = _cupy_peak_hook()
            hook.__enter__()
    baseline = peak_rss_bytes()
    bench = BENCHES[impl](device, batch)
    bench.train_step()
    bench.train_step()
    bench.sync()
    result = {"host_baseline_bytes": baseline, "host_peak_bytes": peak_rss_bytes(),
              "host_extra_bytes": peak_rss_bytes() - baseline}
    if device == "gpu":
        if impl == "torch":
            result["device_peak_bytes"] = torch.cuda.max_memory_allocated()
            result["device_reserved_bytes"] = torch.cuda.max_memory_reserved()
        else:
            import cupy

            hook.__exit__(None, None, None)
            result["device_peak_bytes"] = hook.peak
            result["device_reserved_bytes"] = cupy.get_default_memory_pool().total_bytes()
    return result


def measure_memory(impl, device, batch, threads):
    command = [sys.executable, "-m", "bench.bench_step", "--memory-probe", impl,
               "--device", device, "--batch", str(batch), "--threads", str(threads)]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {impl} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def timed(bench, fn):
    bench.sync()
    start = time.perf_counter()
    fn()
    bench.sync()
    return time.perf_counter() - start


def time_row(benches, make_fn, repeats, label, min_seconds=0.0):
    """Two warm-up calls each, then rounds alternating the implementations: at least
    ``repeats``, and more (up to ``MAX_ROUNDS``) until the timed calls add up to ``min_seconds``."""
    for bench in benches:
        for _ in range(2):
            timed(bench, make_fn(bench))
    times = {bench.name: [] for bench in benches}
    rounds = 0
    while rounds < repeats or (sum(map(sum, times.values())) < min_seconds and rounds < MAX_ROUNDS):
        rounds += 1
        for bench in benches:
            times[bench.name].append(timed(bench, make_fn(bench)))
        print(f"  {label}: round {rounds}: "
              + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), file=sys.stderr, flush=True)
    return times


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def format_seconds(s):
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def format_bytes(b):
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def print_table(result):
    header = ("row", "rounds", "tinyddpm median (min-max)", "torch median (min-max)", "tinyddpm/torch", "paired",
              "of mins")
    lines = []
    for label, row in result["rows"].items():
        cells = [label, str(len(row["tinyddpm"]["times_s"]))]
        for impl in IMPLEMENTATIONS:
            s = row[impl]
            cells.append(f"{format_seconds(s['median'])} ({format_seconds(s['min'])}-{format_seconds(s['max'])})")
        cells += [f"{row['ratio']:.2f}", f"{row['paired_ratio']:.2f}", f"{row['ratio_of_mins']:.2f}"]
        lines.append(cells)
    memory = result.get("memory")
    if memory:
        key = "device_peak_bytes" if result["config"]["device"] == "gpu" else "host_extra_bytes"
        what = "device" if key.startswith("device") else "extra RSS"
        lines.append([f"peak memory, train step ({what})", "1",
                      format_bytes(memory["tinyddpm"][key]), format_bytes(memory["torch"][key]),
                      f"{memory['ratio']:.2f}", "", ""])
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    for cells in [header, ["-" * w for w in widths], *lines]:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())


def run(args):
    device, batch, repeats, threads = args.device, args.batch, args.repeats, args.threads
    if device == "gpu":
        reason = gpu_skip_reason()
        if reason is not None:
            print(f"bench_step: skipping the GPU benchmark: {reason}", file=sys.stderr)
            return 0
        setup_gpu(args.tf32)
    limit_threads(threads, uses_torch=True)
    env = environment(device, threads)
    print(f"bench_step: example network, float32, device {device}, batch {batch}, at least "
          f"{repeats} rounds and {args.min_row_seconds:g} s a row, {threads} threads, {env['cpu_model']}",
          file=sys.stderr)

    tiny = TinyddpmBench(device, batch)
    torch_bench = TorchBench(device, batch, state=tiny.model.state_dict())
    benches = [tiny, torch_bench]
    rows = {
        f"train step, batch {batch}": lambda b: b.train_step,
        "sample step, batch 16": lambda b: (lambda: b.sample_step(16)),
        f"sample step, batch {batch}": lambda b: (lambda: b.sample_step(batch)),
    }
    result = {"config": {"device": device, "batch": batch, "repeats": repeats,
                         "min_row_seconds": args.min_row_seconds, "threads": threads,
                         "allocator": args.allocator, "tf32": args.tf32,
                         "sample_step_t": SAMPLE_STEP, "network": "example", "dtype": "float32"},
              "environment": env, "rows": {}}
    for label, make_fn in rows.items():  # (at --batch 16 the two sample rows are one)
        times = time_row(benches, make_fn, repeats, label, args.min_row_seconds)
        row = {impl: {"times_s": times[impl], **summary(times[impl])} for impl in IMPLEMENTATIONS}
        row["ratio"] = row["tinyddpm"]["median"] / row["torch"]["median"]
        row["paired_ratio"] = statistics.median(a / b for a, b in zip(times["tinyddpm"], times["torch"]))
        row["ratio_of_mins"] = row["tinyddpm"]["min"] / row["torch"]["min"]
        result["rows"][label] = row
    del tiny, torch_bench, benches

    if not args.skip_memory:
        print("  peak memory: one subprocess per implementation ...", file=sys.stderr, flush=True)
        memory = {impl: measure_memory(impl, device, batch, threads) for impl in IMPLEMENTATIONS}
        key = "device_peak_bytes" if device == "gpu" else "host_extra_bytes"
        memory["ratio"] = memory["tinyddpm"][key] / memory["torch"][key]
        memory["method"] = (
            "fresh subprocess per implementation; peak RSS (VmHWM, else ru_maxrss) after imports "
            "subtracted from the peak after building model, optimiser, batch and running a warm-up "
            "step and one more step" + (
                "; device: CuPy pool bytes handed out (memory hook peak) and pool size, torch "
                "max_memory_allocated / max_memory_reserved" if device == "gpu" else ""))
        result["memory"] = memory

    result["environment"]["loadavg_at_end"] = os.getloadavg()
    print_table(result)
    suffix = ("_tuned_malloc" if args.allocator == "tuned" else "") + ("_tf32" if args.tf32 else "")
    out = Path(args.out or f"bench/results/bench_step_{device}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per row, at least (default 3)")
    parser.add_argument("--min-row-seconds", type=float, default=30.0,
                        help=f"more rounds (up to {MAX_ROUNDS}) while a row has taken less than this (default 30)")
    parser.add_argument("--batch", type=int, default=128, help="training batch (default 128, the example's)")
    parser.add_argument("--threads", type=int,
                        help="threads for both implementations (default: os.cpu_count() on the CPU, 1 on the GPU)")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the peak-memory row")
    parser.add_argument("--out", help="JSON path (default bench/results/bench_step_<device>.json)")
    parser.add_argument("--allocator", choices=("default", "tuned"), default="default",
                        help="glibc malloc as it comes, or tuned to keep freed memory (GLIBC_TUNABLES="
                             f"{TUNED_MALLOC}) for both implementations")
    parser.add_argument("--tf32", action="store_true",
                        help="GPU: TF32 tensor-core matrix products in both implementations")
    parser.add_argument("--memory-probe", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.device == "gpu" else os.cpu_count()
    if args.allocator == "tuned" and os.environ.get("GLIBC_TUNABLES") != TUNED_MALLOC:
        # glibc reads its tunables at start-up only: run again under them.
        env = {**os.environ, "GLIBC_TUNABLES": TUNED_MALLOC}
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "bench.bench_step", *argv], env)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.device, args.batch, args.threads)))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
