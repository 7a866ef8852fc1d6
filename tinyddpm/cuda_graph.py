"""The sampler's forward pass, recorded once as a CUDA graph and replayed at every step.

On the GPU a forward pass of the example network is several hundred small kernels. At
sampling batches each one runs for microseconds, and launching it from Python costs about
as much again, so a step is paced by the host rather than by the GPU. A CUDA graph records
the launches of one pass (stream capture) and replays all of them with one call.

A recorded graph holds the device addresses of everything it read and wrote, so:

- its inputs (images, steps, labels) live in fixed arrays that every call copies into,
  and the forward pass itself copies nothing from the host (``UNet.forward`` takes the
  steps and labels as device arrays);
- the arrays the pass allocates come from a memory pool of the graph's own, which nothing
  else allocates from, so no other array can be handed an address the graph writes to;
- the weights are read where they are: a graph is only valid while they stay put, so
  :func:`tinyddpm.sampling.forward_without_grad` keeps graphs inside ``frozen_weights()``.

CuPy will not call cuBLAS during a capture, so the pass's matrix products go to cuBLAS
directly while it is recorded (``nn/cublas.py``, through ``nn.matmul.products_through``).
All graphs share that handle's workspace, so they must not run at the same time: each is
launched on the current stream, after the copies of its inputs.
"""

import contextlib
import os

import numpy as np

from tinyddpm.nn.cublas import capture_blas
from tinyddpm.nn.matmul import products_through


class CapturedForward:
    """``model(x, steps, labels)`` without grad, recorded for one batch shape.

    The first call of the model runs outside the capture: it compiles the kernels and fills
    the ``frozen_weights()`` caches (the prepared weight matrices), which later calls reuse.
    """

    def __init__(self, model, x, steps, labels=None):
        import cupy

        self.x = x.copy()
        self.steps = cupy.asarray(np.ascontiguousarray(steps))
        self.labels = None if labels is None else cupy.asarray(np.ascontiguousarray(labels))
        model(self.x, self.steps, self.labels)
        self.pool = cupy.cuda.MemoryPool()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        blas = capture_blas(self.stream, tf32=os.environ.get("CUPY_TF32") == "1")
        with self.stream, cupy.cuda.using_allocator(self.pool.malloc), products_through(blas):
            self.stream.begin_capture()
            try:
                self.out = model(self.x, self.steps, self.labels)
            except BaseException:
                with contextlib.suppress(Exception):  # leave the stream usable; the first error is the one to see
                    self.stream.end_capture()
                raise
            self.graph = self.stream.end_capture()

    def __call__(self, x, steps, labels=None):
        """The replayed pass on new inputs of the recorded shape; returns a new array."""
        self.x[...] = x
        self.steps.set(np.ascontiguousarray(steps, dtype=self.steps.dtype))
        if labels is not None:
            self.labels.set(np.ascontiguousarray(labels, dtype=self.labels.dtype))
        self.graph.launch()
        return self.out.copy()

    def __del__(self):
        # A CuPy MemoryPool that is dropped keeps its device memory (measured: 4 MiB lost
        # per pool of 4 MB of blocks), so hand the blocks back before the pool goes.
        self.graph = self.out = None
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.free_all_blocks()
