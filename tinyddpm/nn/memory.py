"""Reuse of large arrays: the layers' outputs and gradients on the CPU come from here.

glibc's malloc, as it comes, gives every freed block of 32 MB or more back to the
kernel and maps a fresh one for the next request, whose pages then fault in and are
zeroed one by one as they are first written. A batch-128 step of the example network
makes gigabytes of such arrays, so that costs a sixth of a sampling step.

Inside :func:`array_cache`, :func:`empty` hands out an array whose memory comes from a
buffer that an earlier call handed out and whose user has since let go of it: the
cache then holds the buffer's only reference, which ``sys.getrefcount`` shows. Every
array made from the returned one (a view, a reshape, a slice) refers to the buffer, so
the buffer is not handed out again while any of them lives. A request takes the
smallest free buffer that is big enough (the same shapes recur at every step, so most
fit exactly), or a new one; the cache is dropped when the outermost block ends.
``train`` and ``sample`` run inside one.

Outside a block, on CuPy (whose memory pool already does this), and for arrays
smaller than ``MIN_BYTES`` (which malloc keeps on its free lists anyway), :func:`empty`
is ``xp.empty``. The layers call it from the thread that runs them, never from chunks.
"""

import contextlib
import math
import sys
import threading

import numpy as np

from tinyddpm.backend import get_array_module

MIN_BYTES = 1 << 20

_buffers = None  # the uint8 buffers handed out so far, inside array_cache()
_lock = threading.Lock()  # finding a free buffer and handing it out is one step


def _refcount_when_free():
    """What ``sys.getrefcount`` says, in :func:`empty`'s loop, of a buffer that only its list holds."""
    for buffer in [np.empty(1, dtype=np.uint8)]:
        return sys.getrefcount(buffer)


_FREE = _refcount_when_free()


@contextlib.contextmanager
def array_cache():
    """Reuse the memory of dead large arrays for new ones until the block ends."""
    global _buffers
    if _buffers is not None:  # nested: the outer block's cache serves
        yield
        return
    _buffers = []
    try:
        yield
    finally:
        _buffers = None


def typed_view(buffer, shape, dtype):
    """The first bytes of the uint8 array ``buffer`` as an array of ``shape`` and ``dtype``."""
    dtype = np.dtype(dtype)
    return buffer[:math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)


def empty(shape, dtype, xp=np):
    """An uninitialised array of ``shape`` and ``dtype`` on ``xp``, from the cache where there is one."""
    if xp is not np or _buffers is None:
        return xp.empty(shape, dtype=dtype)
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    with _lock:
        best = None
        for buffer in _buffers:  # the smallest free buffer that is big enough
            if buffer.nbytes >= nbytes and sys.getrefcount(buffer) == _FREE:
                if best is None or buffer.nbytes < best.nbytes:
                    best = buffer
        if best is None:
            best = np.empty(nbytes, dtype=np.uint8)
            _buffers.append(best)
        return typed_view(best, shape, dtype)


def empty_like(a):
    """:func:`empty` with the shape, dtype and array module of ``a`` (C order)."""
    return empty(a.shape, a.dtype, get_array_module(a))
