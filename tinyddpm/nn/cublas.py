"""Matrix products straight from cuBLAS, for use while a CUDA graph is being captured.

CuPy refuses to call cuBLAS on a stream that is capturing (``NotImplementedError: calling
cuBLAS API during stream capture is currently unsupported``), though cuBLAS itself can be
captured: its kernels go into the graph like any other, and host scalars (alpha, beta) are
read once, at capture. So the capture keeps a cuBLAS handle of its own, bound to the
capture stream, and calls the library through ctypes.

cuBLAS is column-major and NumPy row-major. A row-major (m, n) matrix with row stride ld is
the column-major (n, m) matrix of the same memory with leading dimension ld: its transpose.
So ``C = A @ B`` is computed as ``C^T = B^T @ A^T``, with B passed first; an operand that is
itself a transposed view (unit stride down its columns) is passed with the transpose flag.
"""

import contextlib
import ctypes
import ctypes.util
import os

import numpy as np

from tinyddpm.backend import get_array_module

OP_N, OP_T = 0, 1
DEFAULT_MATH, TF32_TENSOR_OP_MATH = 0, 3
WORKSPACE_BYTES = 32 * 2**20  # what cuBLAS asks for on Hopper


def _load_library():
    """libcublas as CuPy loaded it (its path from this process's memory map), else by name."""
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libcublas.so"):
                    return ctypes.CDLL(path)
    name = ctypes.util.find_library("cublas")
    if name is None:
        raise OSError("libcublas was not found")
    return ctypes.CDLL(name)


class CaptureBlas:
    """A cuBLAS handle of tinyddpm's own, with :meth:`matmul` for CuPy arrays.

    :meth:`bind` points it at the stream being captured. Its workspace is a CuPy array that
    lives as long as the handle, as the graphs' kernels use it. The process keeps one
    (:func:`capture_blas`), as CuPy keeps one handle per device for its own products.
    """

    def __init__(self):
        import cupy

        self.lib = _load_library()
        self.handle = ctypes.c_void_p()
        self._check("cublasCreate_v2", ctypes.byref(self.handle))
        self.workspace = cupy.empty(WORKSPACE_BYTES, dtype=np.uint8)

    def bind(self, stream, tf32=False):
        """Run the handle's products on ``stream``, in TF32 or plain float32."""
        self._check("cublasSetStream_v2", self.handle, ctypes.c_void_p(stream.ptr))
        self._check("cublasSetWorkspace_v2", self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                    ctypes.c_size_t(WORKSPACE_BYTES))  # after the stream: setting one resets the other
        self._check("cublasSetMathMode", self.handle, TF32_TENSOR_OP_MATH if tf32 else DEFAULT_MATH)
        return self

    def close(self):
        if self.handle:
            self._check("cublasDestroy_v2", self.handle)
            self.handle = ctypes.c_void_p()

    def _check(self, name, *args):
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise RuntimeError(f"cuBLAS {name} failed with status {status}")

    def matmul(self, a, b, out=None):
        """``a @ b`` for 2-D operands, or stacks of matrices with the same leading shape."""
        xp = get_array_module(a)
        if a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"cannot multiply shapes {a.shape} and {b.shape} here")
        if a.dtype != b.dtype or a.dtype not in (np.float32, np.float64):
            raise TypeError(f"cuBLAS products take two float32 or two float64 operands, got {a.dtype}, {b.dtype}")
        shape = a.shape[:-1] + b.shape[-1:]
        if a.size == 0 or b.size == 0:  # nothing to multiply; an empty sum is 0
            if out is None:
                return xp.zeros(shape, a.dtype)
            out[...] = 0
            return out
        (a, layout_a), (b, layout_b) = _readable(a), _readable(b)
        c = out if out is not None and out.dtype == a.dtype and _layout(out, OP_N) else xp.empty(shape, a.dtype)
        (op_a, ld_a, stride_a), (op_b, ld_b, stride_b), (_, ld_c, stride_c) = layout_a, layout_b, _layout(c)
        m, k, n = shape[-2], a.shape[-1], shape[-1]
        batch = int(np.prod(shape[:-2], dtype=np.int64))
        self._gemm(a.dtype, op_b, op_a, n, m, k, (b, ld_b, stride_b), (a, ld_a, stride_a), (c, ld_c, stride_c), batch)
        if out is None:
            return c
        if c is not out:
            out[...] = c
        return out

    def _gemm(self, dtype, op_x, op_y, m, n, k, x, y, z, batch):
        """Column-major ``Z = op(X) @ op(Y)`` (m, n), for ``batch`` matrices; x, y, z are
        (array, leading dimension, batch stride)."""
        scalar, prefix = (ctypes.c_float, "S") if dtype == np.float32 else (ctypes.c_double, "D")
        one, zero = scalar(1.0), scalar(0.0)
        (x, ld_x, stride_x), (y, ld_y, stride_y), (z, ld_z, stride_z) = x, y, z
        matrices = [(ctypes.c_void_p(x.data.ptr), max(ld_x, 1)), (ctypes.c_void_p(y.data.ptr), max(ld_y, 1))]
        args = [self.handle, op_x, op_y, m, n, k, ctypes.byref(one)]
        if batch == 1:
            args += [*matrices[0], *matrices[1], ctypes.byref(zero), ctypes.c_void_p(z.data.ptr), max(ld_z, 1)]
            self._check(f"cublas{prefix}gemm_v2", *args)
        else:
            args += [*matrices[0], ctypes.c_longlong(stride_x), *matrices[1], ctypes.c_longlong(stride_y),
                     ctypes.byref(zero), ctypes.c_void_p(z.data.ptr), max(ld_z, 1), ctypes.c_longlong(stride_z),
                     batch]
            self._check(f"cublas{prefix}gemmStridedBatched", *args)


_capture_blas = None


def capture_blas(stream, tf32=False):
    """The process's :class:`CaptureBlas`, made on first use and bound to ``stream``."""
    global _capture_blas
    if _capture_blas is None:
        _capture_blas = CaptureBlas()
    return _capture_blas.bind(stream, tf32)


def _readable(x):
    """``(x, its layout)``, or a contiguous copy of ``x`` and its layout where cuBLAS cannot read ``x``."""
    layout = _layout(x)
    if layout is None:
        x = get_array_module(x).ascontiguousarray(x)
        layout = _layout(x)
    return x, layout


def _layout(x, op=None):
    """``(op, leading dimension, batch stride)`` in elements of the stack of matrices ``x``
    as cuBLAS reads it (OP_N: rows are contiguous, OP_T: columns are), or None when it
    cannot read it as it is (or not with the given ``op``)."""
    if any(s % x.itemsize or s < 0 for s in x.strides):
        return None
    strides = [s // x.itemsize for s in x.strides]
    (rows, cols), (row_stride, col_stride) = x.shape[-2:], strides[-2:]
    if col_stride == 1 and row_stride >= max(1, cols):
        found = OP_N, row_stride
    elif row_stride == 1 and col_stride >= max(1, rows):
        found = OP_T, col_stride
    else:
        return None
    batch_stride = _batch_stride(x.shape[:-2], strides[:-2])
    if batch_stride is None or (op is not None and found[0] != op):
        return None
    return (*found, batch_stride)


def _batch_stride(shape, strides):
    """The one stride that steps through all the leading axes in order, or None if there is
    none (0 when there are no leading axes of more than one matrix)."""
    axes = [(size, stride) for size, stride in zip(shape, strides) if size > 1]
    if not axes:
        return 0
    for (_, outer), (inner_size, inner) in zip(axes, axes[1:]):
        if outer != inner * inner_size:
            return None
    return axes[-1][1]
