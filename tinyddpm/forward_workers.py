"""Forward passes without grad in worker processes: how a long CPU sampling run uses every core.

A forward pass without grad splits its batch into one slice per thread
(``parallel.map_batch``). Every NumPy call a thread makes needs Python's GIL to start
and to finish, and a slice of 8 images of the example network makes thousands of calls
of a few microseconds (Winograd's tile transforms, the small arrays at 8x8 pixels); when
the other thread holds the GIL at that moment, the caller sleeps until it is handed over.
In separate processes each slice has a GIL of its own. On the 2-core machine of the
benchmarks, a 16-image sampling step with its second slice in a worker process was
3.6-5.2% faster than with two threads (median of the paired ratios of three interleaved
runs of 24-60 rounds), and a 128-image one 2.4% (16 rounds).

So inside ``frozen_weights()`` (a sampling run), once a pass on threads has taken
``MIN_PASS_SECONDS`` or more, :class:`SliceWorkers` starts ``THREADS - 1`` worker
processes, each with its own copy of the network, and from the next pass on, the
calling process runs the first slice and the workers the others. Each worker runs
``python -m tinyddpm.forward_workers`` on one thread, gets the pickled network once on
its standard input and then one request per pass (its slice of ``x``, the steps, the
labels), and sends back its noise estimate: a few tens of KB each way. The arithmetic is
the threads', so the images are the same to the bit. A worker exits when its input
closes: when the ``frozen_weights()`` block ends (the workers are one of its prepared
forms) or the parent process does. Starting the workers takes about half a second, hence
the minimum pass time: short passes (small networks, tests) stay on threads.
"""

import os
import pickle
import signal
import subprocess
import sys
import time
import warnings

import numpy as np

from tinyddpm.nn import parallel
from tinyddpm.nn.memory import array_cache
from tinyddpm.nn.module import frozen_weights, no_grad

MIN_PASS_SECONDS = 0.25
# A worker computes with one thread: the cores are shared out as processes.
WORKER_ENV = {"TINYDDPM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}


class WorkerError(RuntimeError):
    """A worker process failed, or exited, while running its slice of a forward pass."""


class SliceWorkers:
    """Worker processes that each run ``model`` on one slice of a batch."""

    def __init__(self, model, count):
        # The workers import this very tinyddpm, wherever they start.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, **WORKER_ENV,
               "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.processes = []
        try:
            for _ in range(count):
                self.processes.append(subprocess.Popen([sys.executable, "-m", "tinyddpm.forward_workers"], env=env,
                                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            for process in self.processes:
                self._send(process, model)
            for process in self.processes:
                self._receive(process)
        except BaseException:
            self.close()
            raise

    def __call__(self, run_slice, n, *inputs):
        """``run_slice(start, stop)`` for the first slice of ``range(n)``, here, and the model on
        ``[a[start:stop] for a in inputs]`` (None stays None) for the others, in the workers:
        their results in order, as a list."""
        bounds = parallel.batch_slices(n, len(self.processes) + 1)
        for process, (start, stop) in zip(self.processes, bounds[1:]):
            self._send(process, [None if a is None else a[start:stop] for a in inputs])
        try:
            with parallel.one_blas_thread():
                first = parallel.run_as_slice(run_slice, *bounds[0])
        finally:  # every worker's reply is read, so that the next pass starts in step
            replies = [self._reply(process) for process in self.processes[:len(bounds) - 1]]
        for reply in replies:
            if isinstance(reply, WorkerError):
                raise reply
        return [first, *replies]

    def _send(self, process, value):
        try:
            pickle.dump(value, process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            process.stdin.flush()
        except OSError:  # a broken pipe: the worker is gone
            raise WorkerError(f"forward worker {process.pid} exited with code {process.wait()}") from None

    def _receive(self, process):
        try:
            status, value = pickle.load(process.stdout)
        except EOFError:
            raise WorkerError(f"forward worker {process.pid} exited with code {process.wait()}") from None
        except pickle.UnpicklingError as error:  # a reply cut short by its end, or garbled
            process.kill()
            raise WorkerError(f"forward worker {process.pid} sent a reply that could not be read ({error}); "
                              f"stopped it, code {process.wait()}") from None
        if status == "error":
            raise WorkerError(f"forward worker {process.pid} failed: {value}")
        return value

    def _reply(self, process):
        """:meth:`_receive`, with a failure returned rather than raised."""
        try:
            return self._receive(process)
        except WorkerError as error:
            return error

    def close(self):
        """Close the workers' input, which ends them, and wait for them to exit."""
        for process in self.processes:
            try:
                process.stdin.close()
            except OSError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()
        self.processes = []

    def __del__(self):
        self.close()


class ForwardPool:
    """How a model's passes without grad run, for one ``frozen_weights()`` block: on threads
    (``parallel.map_batch``) until one of them takes ``MIN_PASS_SECONDS``, then on
    :class:`SliceWorkers` (NumPy with more than one thread only)."""

    def __init__(self, model):
        self.model = model
        self.workers = None
        self.slow = False  # a pass on threads took MIN_PASS_SECONDS or more
        self.tried = False  # to start the workers: a failed start warns once, and passes go on on threads

    def __call__(self, run_slice, n, *inputs):
        if self.slow and not self.tried and parallel.THREADS > 1:
            self.tried = True
            try:
                self.workers = SliceWorkers(self.model, parallel.THREADS - 1)
            except Exception as error:  # whatever it is, the threads can still do the work
                warnings.warn(f"sampling on threads, without worker processes: {error}", RuntimeWarning,
                              stacklevel=3)
        if self.workers is not None and n >= 2:
            return self.workers(run_slice, n, *inputs)
        start = time.perf_counter()
        parts = parallel.map_batch(run_slice, n, np)
        self.slow = self.slow or time.perf_counter() - start >= MIN_PASS_SECONDS
        return parts


def serve(requests, replies):
    """A worker's life: the pickled model from ``requests``, then one reply per request,
    until ``requests`` ends."""

    def reply(status, value):
        pickle.dump((status, value), replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()

    try:
        model = pickle.load(requests)
    except (EOFError, pickle.UnpicklingError):  # the parent could not send it, and has warned
        return
    with no_grad(), frozen_weights(), array_cache():
        reply("ok", "ready")
        while True:
            try:
                x, steps, labels = pickle.load(requests)
            except EOFError:
                return
            try:
                reply("ok", parallel.run_as_slice(lambda start, stop: model(x, steps, labels), 0, len(x)))
            except Exception as error:  # the parent raises it, with this message
                reply("error", f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    # Ctrl-C is the parent's to handle: it stops sampling, and the worker's input then closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The replies go to the original standard output. Anything else written there, by Python
    # or by a library's C code, goes to standard error, where it cannot garble a reply.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, replies)
