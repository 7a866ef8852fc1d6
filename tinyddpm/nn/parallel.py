"""Run a layer's work on all CPU cores by splitting it into chunks of the batch.

NumPy does element-wise work and copies on one core, and OpenBLAS spreads the
skinny products of im2col (tens of thousands of rows, 64-256 columns) poorly
over its threads. So the layers split their batch into chunks and hand the
chunks to a small persistent pool of threads; NumPy releases the GIL inside
ufuncs, copies and BLAS calls, so the chunks run side by side. Each chunk writes
straight into its slice of a preallocated output (or returns a partial sum, such
as a weight gradient, that the caller adds up).

Chunks hold a few thousand rows rather than one per thread: a chunk's im2col
copy then stays in cache for the product that reads it, and a thread slowed down
by another process on the machine just takes fewer chunks.

The calling thread works on the chunks too, next to ``THREADS - 1`` helper
threads that sleep on a queue between calls; all of them take the next chunk
from one shared counter. Handing out a call this way costs some 20 us, against
130-220 us for a ``concurrent.futures`` pool with one future per chunk, and a
16-image forward pass makes about 180 calls.

While chunks run, BLAS is held to one thread, as the parallelism comes from the
chunks. That holds for a call of one chunk too (a small product, such as a time
embedding's), and the few products made outside ``map_chunks`` run under
:func:`one_blas_thread` as well: after each multi-threaded call, OpenBLAS keeps its
worker threads busy-waiting for more work for about 2^28 cycles (0.1 s), and on a
2-core machine that spinning thread takes the core that the next chunked layer
needs. Keeping tinyddpm's products off OpenBLAS's threads took a training step at
batch 128 from 18.5 to 15.9 s and a 16-image forward pass from about 1.0 to 0.75 s
(one run each). The limit is set around each call (some microseconds) rather than for the process, so
that the caller's own products keep all BLAS threads.

A forward pass without grad (a sampler's) can go further, as its samples never meet:
:func:`map_batch` gives each thread one slice of the batch and lets it run the whole
network on it, every layer's chunks one after another on that thread. The threads then
wait for each other once per pass instead of at the end of every layer, where one of them
would otherwise sit idle while the other finishes its last chunk.

A chunk's temporaries (a conv's patch matrix, Winograd's transformed tiles) come
from :func:`scratch`, one buffer per thread that the next chunk reuses. glibc's
malloc, as it comes, gives big freed blocks back to the kernel, so a fresh array
for every chunk would be faulted in page by page each time.

On CuPy the GPU runs a whole chunk at once, so chunks run one after another
and exist only to bound memory: work on images (``rows_per_item`` > 1) is split
into chunks of at most ``GPU_CHUNK_ROWS`` pixels, which keeps a convolution's
patch matrix near 150 MB where a whole batch-128 one would take 300-600 MB,
while its products still fill the GPU. Everything else, and all work with one
thread on the CPU, is one call of ``fn`` on the whole range. The thread count is
``os.cpu_count()`` unless the environment variable ``TINYDDPM_THREADS`` says otherwise.
"""

import contextlib
import itertools
import math
import os
import queue
import threading

import numpy as np

from tinyddpm.backend import get_array_module
from tinyddpm.nn.memory import typed_view

THREADS = int(os.environ.get("TINYDDPM_THREADS") or os.cpu_count() or 1)
CHUNKS_PER_THREAD = 4  # spare chunks for a thread that gets ahead while another is held up
CHUNK_ROWS = 4096  # rows (pixels) of a chunk at most: an im2col chunk of a few MB stays in cache
MIN_ROWS = 256  # and at least, or handing out the chunk costs more than it saves
ELEMENT_CHUNK_ROWS = 1 << 16  # the same bounds for element-wise work, where a row is one number
ELEMENT_MIN_ROWS = 1 << 14
GPU_CHUNK_ROWS = 1 << 15

_pool = None
_blas = None
_thread_state = threading.local()


def _runs(n, per_run):
    """``(start, stop)`` pairs cutting ``range(n)`` into runs of ``per_run`` (the last may be shorter)."""
    return [(start, min(start + per_run, n)) for start in range(0, n, per_run)]


def chunk_bounds(n, rows_per_item=1, chunk_rows=CHUNK_ROWS, min_rows=MIN_ROWS):
    """``(start, stop)`` pairs covering ``range(n)``, items of ``rows_per_item`` rows.

    Chunks are at most ``chunk_rows`` rows, but small enough to give every thread
    ``CHUNKS_PER_THREAD`` of them, and at least ``min_rows`` rows (or one item), except
    that work of ``min_rows`` rows or more always gets a chunk for every thread (as far as
    its items go): a thread left idle costs more than a chunk below the minimum.
    """
    per_chunk = min(chunk_rows // rows_per_item, -(-n // (CHUNKS_PER_THREAD * THREADS)))
    floor = -(-min_rows // rows_per_item)
    if n * rows_per_item >= min_rows:
        floor = min(floor, -(-n // THREADS))
    return _runs(n, max(per_chunk, floor, 1))


def slice_chunk_bounds(n, rows_per_item=1, chunk_rows=CHUNK_ROWS, min_rows=MIN_ROWS):
    """The chunks of one thread's slice of a :func:`map_batch`, which it does alone.

    With no other thread to share them with, a slice keeps no spare chunks: each is
    at most ``chunk_rows`` rows and at least half that (or ``min_rows``, or a
    ``CHUNKS_PER_THREAD``-th of the slice). In quarters, a 16-image pass's slices of 8
    came in pieces of 2 images whose fixed costs showed: half-``chunk_rows`` chunks made
    the pass 5-8% faster, and left batch 128's, whose quarters are larger, as they were.
    """
    most = max(chunk_rows // rows_per_item, 1)
    return _runs(n, min(most, max(-(-n // CHUNKS_PER_THREAD), -(-most // 2), -(-min_rows // rows_per_item))))


class _OneBlasThread:
    """Sets every loaded BLAS to one thread, and back to its own setting on exit.

    It talks to threadpoolctl's per-library controllers directly: its ``limit()``
    context costs about 10 us, and a forward pass enters this some 200 times.
    """

    def __init__(self, libraries):
        self.libraries = libraries

    def __enter__(self):
        self.saved = [(lib, lib.get_num_threads()) for lib in self.libraries]
        for lib, threads in self.saved:
            if threads != 1:
                lib.set_num_threads(1)

    def __exit__(self, *exc):
        for lib, threads in self.saved:
            if threads != 1:
                lib.set_num_threads(threads)


def one_blas_thread():
    """A context in which BLAS runs on one thread (on a one-thread setup, BLAS is left alone)."""
    global _blas
    if THREADS == 1:
        return contextlib.nullcontext()
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController().select(user_api="blas").lib_controllers
    return _OneBlasThread(_blas)


class _Call:
    """One ``map_chunks`` call: ``fn`` over ``bounds``, chunk indices handed out one at a time."""

    def __init__(self, fn, bounds):
        self.fn, self.bounds = fn, bounds
        self.results = [None] * len(bounds)
        self.error = None
        self.finished = threading.Event()  # set by whichever thread completes the last chunk
        # next() on these is atomic under the GIL
        self._next = iter(range(len(bounds)))
        self._completed = itertools.count(1)

    def work(self):
        for i in self._next:
            if self.error is None:
                try:
                    self.results[i] = self.fn(*self.bounds[i])
                except BaseException as error:  # raised again in the calling thread
                    self.error = error
            if next(self._completed) == len(self.bounds):
                self.finished.set()


class _Pool:
    """Helper threads that join the calling thread on the chunks of each call.

    The caller never waits for a helper as such, only for the last chunk: a helper
    that wakes up after the caller has taken every chunk finds none left, and a small
    call costs no wake-up at all.
    """

    def __init__(self):
        self._inboxes = []

    def run(self, call, helpers):
        while len(self._inboxes) < helpers:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), daemon=True,
                             name=f"tinyddpm-{len(self._inboxes)}").start()
            self._inboxes.append(inbox)
        for inbox in self._inboxes[:helpers]:
            inbox.put(call)
        call.work()
        call.finished.wait()
        if call.error is not None:
            raise call.error
        return call.results

    @staticmethod
    def _serve(inbox):
        while True:
            inbox.get().work()


def _run_on_pool(fn, bounds):
    """``[fn(*b) for b in bounds]``, on the calling thread and as many helpers as there are bounds."""
    global _pool
    if _pool is None:
        _pool = _Pool()
    return _pool.run(_Call(fn, bounds), min(THREADS, len(bounds)) - 1)


def _in_batch_slice():
    """True in a thread that is running its slice of a :func:`map_batch`."""
    return getattr(_thread_state, "in_batch_slice", False)


def map_chunks(fn, n, xp, rows_per_item=1, chunk_rows=CHUNK_ROWS, min_rows=MIN_ROWS):
    """``[fn(start, stop) for each chunk]`` of ``range(n)``, run on all threads.

    ``n`` items of ``rows_per_item`` rows each (a batch of images of H*W pixels)
    are split by :func:`chunk_bounds`. ``fn`` must only write its own chunk of any
    shared output, and must not call ``map_chunks`` itself. Inside a slice of
    :func:`map_batch` the chunks run one after another on the slice's thread.
    """
    if xp is not np:
        if rows_per_item == 1:
            return [fn(0, n)]
        return [fn(*b) for b in _runs(n, max(GPU_CHUNK_ROWS // rows_per_item, 1))]
    if _in_batch_slice():
        return [fn(*b) for b in slice_chunk_bounds(n, rows_per_item, chunk_rows, min_rows)]
    bounds = chunk_bounds(n, rows_per_item, chunk_rows, min_rows)
    with one_blas_thread():
        if THREADS == 1 or len(bounds) == 1:
            return [fn(0, n)]
        return _run_on_pool(fn, bounds)


def map_batch(fn, n, xp):
    """``[fn(start, stop)]`` over one slice of ``range(n)`` per thread, each slice's whole work
    done by one thread: for work whose samples never meet, such as a forward pass without grad.

    Every :func:`map_chunks` call inside a slice runs its chunks one after another on that
    slice's thread, so the threads first wait for each other at the end, not at the end of
    every layer: layer by layer, a 16-image forward pass left one thread idle for 46 ms
    (about 8%), in the gaps between the two threads' last chunks of about 110 calls. On CuPy,
    with one thread, or inside a slice already, it is one call ``fn(0, n)``.
    """
    if xp is not np or THREADS == 1 or n < 2 or _in_batch_slice():
        return [fn(0, n)]
    with one_blas_thread():
        return _run_on_pool(lambda start, stop: run_as_slice(fn, start, stop), batch_slices(n, THREADS))


def batch_slices(n, parts):
    """``range(n)`` cut into ``parts`` slices of equal size (the last may be smaller), fewer if n < parts."""
    return _runs(n, -(-n // parts))


def run_as_slice(fn, start, stop):
    """``fn(start, stop)`` as one slice of a :func:`map_batch`: its :func:`map_chunks` calls run their
    chunks one after another on this thread."""
    _thread_state.in_batch_slice = True
    try:
        return fn(start, stop)
    finally:
        _thread_state.in_batch_slice = False


def scratch(name, shape, dtype):
    """A work array of ``shape`` and ``dtype`` (NumPy) for the calling thread, uninitialised.

    The thread's next request under the same ``name`` reuses the memory, so the array is
    good for the chunk that asked for it: use it inside one chunk and never return it.
    Different temporaries of one chunk need different names.
    """
    buffers = _thread_state.__dict__.setdefault("buffers", {})
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buffer = buffers.get(name)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = buffers[name] = np.empty(nbytes, dtype=np.uint8)
    return typed_view(buffer, shape, dtype)


def map_elementwise(fn, *arrays):
    """``fn(*chunks)`` over matching chunks of the flattened ``arrays`` (all the same size).

    Arrays written by ``fn`` must be contiguous, so that their flat chunks are views.
    """
    xp = get_array_module(*arrays)
    flat = [a.reshape(-1) for a in arrays]
    map_chunks(lambda start, stop: fn(*(a[start:stop] for a in flat)), flat[0].size, xp,
               chunk_rows=ELEMENT_CHUNK_ROWS, min_rows=ELEMENT_MIN_ROWS)
