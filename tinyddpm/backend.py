"""The array backend: NumPy on the CPU, CuPy on the GPU.

Every layer is written once against an array module ``xp`` and finds it from
its inputs with :func:`get_array_module`, so the same code runs on both
devices. Arrays cross between host and device only at the edges (data loading,
checkpoint I/O, image export) through :func:`to_device` and :func:`to_host`.
"""

import ctypes
import ctypes.util
import os

import numpy as np

try:
    import cupy
except ImportError:  # CuPy is the optional `gpu` extra
    cupy = None

DEVICES = ("cpu", "gpu")


class DeviceError(RuntimeError):
    """The requested device cannot be used (no CuPy, no GPU)."""


def get_array_module(*arrays):
    """Return ``cupy`` if any of ``arrays`` lives on the GPU, else ``numpy``."""
    if cupy is not None:
        return cupy.get_array_module(*arrays)
    return np


def gpu_unavailable_reason():
    """Why the GPU cannot be used, or None if it can."""
    if cupy is None:
        return "CuPy is not installed (pip install 'tinyddpm[gpu]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDA driver/runtime missing or broken
        return f"CUDA is not usable ({type(error).__name__}: {error})".splitlines()[0]
    if count == 0:
        return "no CUDA GPU was found"
    return None


def array_module(device):
    """The array module for ``device`` ('cpu' or 'gpu'); DeviceError if unusable."""
    if device == "cpu":
        return np
    if device == "gpu":
        reason = gpu_unavailable_reason()
        if reason is not None:
            raise DeviceError(f"--device gpu is not available: {reason}")
        return cupy
    raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")


def enable_tf32():
    """Let CuPy's float32 matrix products use TF32 tensor cores: inputs rounded to a 10-bit
    mantissa, float32 accumulation. CuPy reads the setting at its first float32 product, so
    call this before any work. Element-wise kernels and reductions stay float32."""
    os.environ["CUPY_TF32"] = "1"


def to_device(array, xp):
    """Copy a host (or device) array onto the device of array module ``xp``."""
    if xp is np:
        return to_host(array)
    return xp.asarray(array)


def to_host(array):
    """Return ``array`` as a NumPy array (a no-op for NumPy input)."""
    if cupy is not None and isinstance(array, cupy.ndarray):
        return cupy.asnumpy(array)
    return np.asarray(array)


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the kernel.

    With glibc's defaults every array over 32 MB is a fresh mapping, and freed heap space is
    soon trimmed, so each training step faults in (and the kernel zeroes) many GB of new pages:
    a quarter of a CPU step of the example network. The command line calls this at start-up,
    as it owns its process; the library never does, as it would change the process of whoever
    imports it. The same as ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``;
    a no-op where the C library is not glibc or the user has set GLIBC_TUNABLES.
    """
    if os.environ.get("GLIBC_TUNABLES"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
