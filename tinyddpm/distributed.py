"""Synchronous data parallelism over MPI: one process (rank) per CPU or GPU.

``mpiexec -n N tinyddpm train --distributed ...`` starts N ranks. Each builds
the same network from the same seed and draws the same global batch as a
single process would (the same order, steps ``t`` and noise), then keeps its
own rows of it: rank r takes rows ``r B/N`` to ``(r + 1) B/N``. After backward
every rank's gradients are packed into one flat float32 buffer and summed by a
single all-reduce a step. The sum is the whole batch's gradient, and every
rank takes the same Adam step with it. The step's loss and a stop flag (a
Ctrl-C on any rank) travel in the last two slots of the same buffer.

The buffer is summed by MPI's ``Allreduce`` in host memory. On GPUs NCCL sums
it on the devices when CuPy has NCCL and no two ranks share a GPU. Without
NCCL, the buffer is copied to host memory, reduced by MPI and copied back.
Each rank uses the GPU numbered by its rank among the processes on its own
machine (its local rank), modulo the machine's GPU count.

mpi4py is imported only when a group is made, so the module can be loaded
without it.
"""

import contextlib
import os
import sys
import time
import traceback

import numpy as np

from tinyddpm.backend import DeviceError, get_array_module, gpu_unavailable_reason, to_host

# Set by the launchers for each process they start: MPICH and Intel MPI (Hydra), Open MPI.
_LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


class DistributedError(RuntimeError):
    """A distributed run cannot start. Every rank raises it alike, so no rank is left waiting."""


def launched_ranks():
    """How many processes an MPI launcher started alongside this one (1 if none), from the environment."""
    for name in _LAUNCHER_SIZE_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def _mpi():
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as error:  # RuntimeError: mpi4py is there but no MPI library
        raise DistributedError(f"--distributed needs mpi4py and an MPI library ({error}); "
                               "install them with: pip install 'tinyddpm[distributed]'") from None
    return MPI


def init(device="cpu"):
    """Join the job that mpiexec started and return its :class:`ProcessGroup`.

    Without mpiexec this process is a job of one rank. On the GPU this also picks
    the rank's device, so call it before any CuPy array is made.
    """
    MPI = _mpi()
    comm = MPI.COMM_WORLD
    machine = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this rank's machine
    local_rank, local_size = machine.Get_rank(), machine.Get_size()
    machine.Free()
    if device == "gpu":
        return ProcessGroup(comm, device, _use_gpu(comm, local_rank, local_size))
    _share_cores(local_size)
    return ProcessGroup(comm, device)


def _use_gpu(comm, local_rank, local_size):
    """Select GPU ``local_rank % count``; return an NCCL communicator, or None to reduce via host memory."""
    reasons = comm.allgather(gpu_unavailable_reason())
    for rank, reason in enumerate(reasons):
        if reason is not None:
            raise DistributedError(f"--device gpu is not available on rank {rank}: {reason}")
    import cupy
    from cupy.cuda import nccl

    count = cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(local_rank % count).use()
    # NCCL refuses two ranks on one GPU; every rank must make the same choice.
    if not all(comm.allgather(bool(nccl.available) and local_size <= count)):
        return None
    unique_id = comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
    return nccl.NcclCommunicator(comm.Get_size(), unique_id, comm.Get_rank())


def _share_cores(local_size):
    """CPU ranks on one machine split its cores among their BLAS threads, unless OMP_NUM_THREADS says otherwise."""
    if local_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        from threadpoolctl import threadpool_limits

        threadpool_limits(max(1, len(os.sched_getaffinity(0)) // local_size))


class ProcessGroup:
    """The ranks of one job, and the one collective that training needs: a sum of gradients."""

    def __init__(self, comm, device="cpu", nccl=None):
        self.comm, self.nccl = comm, nccl
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0  # the rank that writes files and logs
        self.transport = "NCCL" if nccl is not None else "MPI through host memory" if device == "gpu" else "MPI"
        self._buffer = None

    def shard(self, batch_size):
        """This rank's rows of a global batch of ``batch_size``: a slice of ``batch_size / size`` rows."""
        if batch_size % self.size:
            raise DistributedError(f"batch size {batch_size} does not split evenly over {self.size} processes; "
                                   f"use a multiple of {self.size}")
        rows = batch_size // self.size
        return slice(self.rank * rows, (self.rank + 1) * rows)

    def check_same(self, what, value):
        """Raise DistributedError on every rank unless all ranks hold the same ``value``."""
        values = self.comm.allgather(value)
        if any(v != values[0] for v in values):
            raise DistributedError(f"the processes disagree on {what}: {values} by rank "
                                   "(do all machines see the same data and checkpoint?)")

    def sum_gradients(self, params, loss, stop):
        """Sum ``param.grad`` over the ranks in place, with this rank's ``loss`` and ``stop`` flag.

        ``params`` is the ``{name: Parameter}`` dict, in the same order on every
        rank. Returns the summed loss and whether any rank asked to stop.
        """
        grads = [param.grad for param in params.values()]
        if self._buffer is None:
            xp = get_array_module(grads[0])
            self._buffer = xp.empty(sum(g.size for g in grads) + 2, dtype=np.float32)
        buffer, offset = self._buffer, 0
        for g in grads:
            buffer[offset:offset + g.size] = g.ravel()
            offset += g.size
        buffer[offset] = loss
        buffer[offset + 1] = float(stop)
        self._allreduce(buffer)
        offset = 0
        for g in grads:
            g[...] = buffer[offset:offset + g.size].reshape(g.shape)
            offset += g.size
        loss, stops = to_host(buffer[offset:])
        return float(loss), bool(stops > 0)

    def _allreduce(self, buffer):
        from mpi4py import MPI

        if self.nccl is not None:
            import cupy
            from cupy.cuda import nccl

            self.nccl.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM,
                                cupy.cuda.get_current_stream().ptr)
        elif isinstance(buffer, np.ndarray):
            self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        else:  # a CuPy buffer without NCCL
            host = to_host(buffer)
            self.comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
            buffer.set(host)

    @contextlib.contextmanager
    def abort_on_error(self):
        """End the whole job when any rank fails; the others would wait forever at the next all-reduce.

        The failing rank says which it is and why, then ``MPI_Abort`` stops every
        rank. Checkpoints are replaced atomically, so the last one written is intact.
        A DistributedError is raised on every rank alike and passes through, as do
        all errors in a job of one.
        """
        try:
            yield
        except DistributedError:
            raise
        except BaseException as error:  # a second Ctrl-C (KeyboardInterrupt) too
            if self.size == 1:
                raise
            from tinyddpm.checkpoint import CheckpointError
            from tinyddpm.datasets import DataError

            if not isinstance(error, (DataError, CheckpointError, DeviceError, KeyboardInterrupt)):
                traceback.print_exc()
            message = str(error).splitlines()[0] if str(error) else ""
            sys.stderr.write(f"tinyddpm: rank {self.rank} of {self.size} failed: {type(error).__name__}: "
                             f"{message}; stopping all ranks (the last checkpoint written is intact)\n")
            sys.stderr.flush()
            # mpiexec forwards each rank's output through a pipe, and Abort kills the ranks
            # before it is read: a moment's wait keeps the message from being cut off
            # (seen once in a loaded test run, mid-traceback).
            time.sleep(0.2)
            self.comm.Abort(1)
