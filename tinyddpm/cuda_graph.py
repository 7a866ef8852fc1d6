"""Recorded GPU work: the sampler's forward pass and the training update, each recorded
once as a CUDA graph and replayed at every step.

On the GPU a forward pass of the example network is several hundred small kernels, and a
training step a few thousand. Launching each from Python costs microseconds of host time,
as much as many of them take to run, so a step is paced by the host rather than by the
GPU. A CUDA graph records the launches of a step (stream capture) and replays all of them
with one call.

A recorded graph holds the device addresses of everything it read and wrote, so:

- its inputs live in fixed arrays that every call copies into, and the recorded work
  copies nothing from the host (``UNet.forward`` takes the steps and labels as device
  arrays; Adam reads its step size from the device, see ``optim.py``);
- the arrays the work allocates come from a memory pool of the graph's own, which nothing
  else allocates from, so no other array can be handed an address the graph writes to;
- everything else it reads or writes stays where it was at the recording: the weights
  (a sampling graph is kept inside ``frozen_weights()``; a training graph updates them in
  place), their gradients and Adam's moments.

CuPy will not call cuBLAS during a capture, so the recorded matrix products go to cuBLAS
directly (``nn/cublas.py``, through ``nn.matmul.products_through``). All graphs share that
handle's workspace, so they must not run at the same time: each is launched on the current
stream, after the copies of its inputs.
"""

import contextlib
import os
import warnings

import numpy as np

from tinyddpm.nn.cublas import capture_blas
from tinyddpm.nn.matmul import products_through


CUDA_GRAPHS = os.environ.get("TINYDDPM_CUDA_GRAPHS", "1") != "0"  # 0: launch every kernel from Python


class CapturedCall:
    """``fn(*inputs)`` recorded for inputs of the shapes and dtypes of ``inputs`` (CuPy arrays,
    or None for an input that stays None), and replayed by calling with new ones.

    The kernels ``fn`` launches must already be compiled, so run it once before recording.
    The recording itself runs nothing: it changes no array.
    """

    def __init__(self, fn, *inputs):
        import cupy

        self.inputs = [None if a is None else a.copy() for a in inputs]
        self.pool = cupy.cuda.MemoryPool()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        blas = capture_blas(self.stream, tf32=os.environ.get("CUPY_TF32") == "1")
        with self.stream, cupy.cuda.using_allocator(self.pool.malloc), products_through(blas):
            self.stream.begin_capture()
            try:
                self.out = fn(*self.inputs)
            except BaseException:
                with contextlib.suppress(Exception):  # leave the stream usable; the first error is the one to see
                    self.stream.end_capture()
                raise
            self.graph = self.stream.end_capture()

    def __call__(self, *inputs):
        """The replayed work on new inputs (device or host arrays); returns a copy of its output."""
        for fixed, new in zip(self.inputs, inputs):
            if fixed is None:
                continue
            if isinstance(new, np.ndarray) or np.isscalar(new):
                fixed.set(np.ascontiguousarray(new, dtype=fixed.dtype))
            else:
                fixed[...] = new
        self.graph.launch()
        return self.out.copy()

    def __del__(self):
        # A CuPy MemoryPool that is dropped keeps its device memory (measured: 4 MiB lost
        # per pool of 4 MB of blocks), so hand the blocks back before the pool goes.
        self.graph = self.out = self.inputs = None
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.free_all_blocks()


def recorded_or_warn(record, doing, what):
    """``record()`` (a :class:`CapturedCall`), or None and one ``RuntimeWarning`` if the
    recording fails, so that the caller goes on ``doing`` by launching every kernel from Python."""
    try:
        return record()
    except Exception as error:
        warnings.warn(f"{doing} without a CUDA graph: recording {what} failed "
                      f"({type(error).__name__}: {error})".splitlines()[0], RuntimeWarning, stacklevel=3)
        return None


class CapturedForward(CapturedCall):
    """``model(x, steps, labels)`` without grad, recorded for one batch shape.

    The first call of the model runs outside the capture: it compiles the kernels and fills
    the ``frozen_weights()`` caches (the prepared weight matrices), which later calls reuse.
    """

    def __init__(self, model, x, steps, labels=None):
        import cupy

        steps = cupy.asarray(np.ascontiguousarray(steps))
        labels = None if labels is None else cupy.asarray(np.ascontiguousarray(labels))
        model(x, steps, labels)
        super().__init__(model, x, steps, labels)
