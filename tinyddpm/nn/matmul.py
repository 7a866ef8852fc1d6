"""``matmul``, the layers' matrix product: NumPy's or CuPy's, or cuBLAS called directly while
a CUDA graph is being captured (``cublas.py`` says why; ``cuda_graph.py`` captures)."""

import contextlib

import numpy as np

from tinyddpm.backend import get_array_module

_capture_blas = None  # the cublas.CaptureBlas of the capture in progress, if any


def matmul(a, b, out=None):
    """``a @ b`` (into ``out`` if given), as ``xp.matmul``."""
    xp = get_array_module(a)
    if _capture_blas is not None and xp is not np:
        return _capture_blas.matmul(a, b, out)
    return xp.matmul(a, b, out=out)


@contextlib.contextmanager
def products_through(blas):
    """Send the CuPy products of a block to ``blas`` (a ``cublas.CaptureBlas``)."""
    global _capture_blas
    _capture_blas = blas
    try:
        yield
    finally:
        _capture_blas = None
