"""The chunked, threaded path gives the same layers as one whole-batch call."""

import contextlib
import itertools
import threading
import time

import numpy as np
import pytest

from tinyddpm.nn import GroupNorm, GroupNormSwish, Swish, no_grad, parallel
from tinyddpm.nn.conv import conv2d_backward, conv2d_forward
from tinyddpm.nn.conv_transpose import (
    conv_transpose2d_backward,
    conv_transpose2d_forward,
)
from tinyddpm.nn.group_norm import group_norm_backward, group_norm_forward


@pytest.mark.parametrize("n, rows", [(1, 1), (7, 1), (32, 1024), (32, 64), (16, 64), (5, 100000)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_chunk_bounds_cover_the_range_in_order(monkeypatch, n, rows, threads):
    monkeypatch.setattr(parallel, "THREADS", threads)
    bounds = parallel.chunk_bounds(n, rows)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(stop == start for (_, stop), (start, _) in itertools.pairwise(bounds))
    assert all(stop > start for start, stop in bounds)


def test_work_of_the_minimum_size_gets_a_chunk_for_every_thread(monkeypatch):
    """The minimum chunk size never leaves a thread idle on work that reaches it; smaller
    work stays one chunk."""
    monkeypatch.setattr(parallel, "THREADS", 2)
    # 16 items of 2^14 rows: 2^18 rows in all, exactly the minimum
    assert parallel.chunk_bounds(16, 1 << 14, chunk_rows=1 << 20, min_rows=1 << 18) == [(0, 8), (8, 16)]
    assert parallel.chunk_bounds(16, 256, chunk_rows=1 << 20, min_rows=1 << 18) == [(0, 16)]
    assert parallel.chunk_bounds(1, 1 << 20, min_rows=1 << 18) == [(0, 1)]


def test_map_batch_gives_each_thread_a_slice_and_runs_its_chunks_on_that_thread(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 2)

    def on_slice(start, stop):
        time.sleep(0.01)  # lets the helper take the other slice meanwhile
        chunk_threads = parallel.map_chunks(lambda a, b: threading.get_ident(), 1000, np, chunk_rows=100)
        return start, stop, threading.get_ident(), set(chunk_threads), len(chunk_threads)

    slices = parallel.map_batch(on_slice, 9, np)
    assert [(start, stop) for start, stop, *_ in slices] == [(0, 5), (5, 9)]
    assert len({thread for _, _, thread, _, _ in slices}) == 2
    for _, _, thread, chunk_threads, chunks in slices:
        assert chunk_threads == {thread} and chunks == 10  # chunks of chunk_rows, on the slice's thread
    assert not parallel._in_batch_slice()


def test_a_slice_takes_chunks_of_half_to_all_of_chunk_rows():
    # 8 images of 8x8 pixels, chunk_rows 2048 (32 images): the slice is one chunk, not quarters
    assert parallel.slice_chunk_bounds(8, 64, chunk_rows=2048) == [(0, 8)]
    # 64 images: quarters of 16, which is half of chunk_rows
    assert parallel.slice_chunk_bounds(64, 64, chunk_rows=2048) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    # 64 images of 32x32: chunk_rows allows 2 at most
    assert len(parallel.slice_chunk_bounds(64, 1024, chunk_rows=2048)) == 32


def test_map_batch_is_one_call_for_one_item_one_thread_or_a_nested_call(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 2)
    assert parallel.map_batch(lambda a, b: (a, b), 1, np) == [(0, 1)]
    assert parallel.map_batch(lambda a, b: parallel.map_batch(lambda c, d: (c, d), b - a, np), 4, np) == [
        [(0, 2)], [(0, 2)]]
    monkeypatch.setattr(parallel, "THREADS", 1)
    assert parallel.map_batch(lambda a, b: (a, b), 4, np) == [(0, 4)]


def test_map_batch_raises_the_error_of_a_slice(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 2)

    def on_slice(start, stop):
        if start > 0:
            raise ValueError("slice failed")
        return start

    with pytest.raises(ValueError, match="slice failed"):
        parallel.map_batch(on_slice, 4, np)
    assert not parallel._in_batch_slice()


def test_map_chunks_returns_results_in_order(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 3)
    out = parallel.map_chunks(lambda start, stop: list(range(start, stop)), 1000, np, min_rows=1)
    assert len(out) > 1
    assert list(itertools.chain(*out)) == list(range(1000))


def test_chunks_run_on_several_threads_and_the_caller_is_one(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 3)

    def chunk(start, stop):
        time.sleep(0.002)  # lets the other threads take chunks meanwhile
        return threading.get_ident()

    threads = set(parallel.map_chunks(chunk, 1000, np, min_rows=1))
    assert len(threads) > 1 and threading.get_ident() in threads


def test_an_error_in_a_chunk_reaches_the_caller_and_the_pool_goes_on(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 3)

    def chunk(start, stop):
        if start >= 500:
            raise ValueError(f"chunk at {start} failed")
        return stop - start

    with pytest.raises(ValueError, match="failed"):
        parallel.map_chunks(chunk, 1000, np, min_rows=1)
    assert sum(parallel.map_chunks(lambda start, stop: stop - start, 1000, np, min_rows=1)) == 1000


def blas_threads():
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]  # one per library


@pytest.mark.parametrize("n", [1, 1000])
def test_chunks_run_with_one_blas_thread_and_the_callers_setting_comes_back(monkeypatch, n):
    """One chunk or many, products inside map_chunks never wake BLAS's own threads."""
    from threadpoolctl import threadpool_limits

    monkeypatch.setattr(parallel, "THREADS", 2)
    with threadpool_limits(2, user_api="blas"):
        seen = parallel.map_chunks(lambda start, stop: blas_threads(), n, np, min_rows=1)
        assert all(set(threads) == {1} for threads in seen)
        with parallel.one_blas_thread():
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {2}


def run_layers(rng):
    """Forward and backward of every chunked layer, in float64, on a batch of 6."""
    x = rng.standard_normal((6, 16, 16, 8))
    results = []
    for kernel, stride in ((3, 1), (3, 2), (1, 1)):
        w, b = rng.standard_normal((5, 8, kernel, kernel)), rng.standard_normal(5)
        out, cache = conv2d_forward(x, w, b, stride)
        results += [out, *conv2d_backward(rng.standard_normal(out.shape), cache)]
    w, b = rng.standard_normal((8, 5, 3, 3)), rng.standard_normal(5)
    out, cache = conv_transpose2d_forward(x, w, b)
    results += [out, *conv_transpose2d_backward(rng.standard_normal(out.shape), cache)]
    out, cache = group_norm_forward(x, rng.standard_normal(8), rng.standard_normal(8), G=4)
    results += [out, *group_norm_backward(rng.standard_normal(out.shape), cache)]
    swish, y = Swish(), rng.standard_normal((6, 16, 16, 64))  # enough numbers for several chunks
    results += [swish(y), swish.backward(rng.standard_normal(y.shape))]
    return results


def test_threaded_layers_match_one_whole_batch_call(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 1)
    whole = run_layers(np.random.default_rng(0))
    monkeypatch.setattr(parallel, "THREADS", 3)  # every layer now splits its batch (or elements)
    chunked = run_layers(np.random.default_rng(0))
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)


def test_gpu_chunks_bound_the_pixels_of_image_work_and_run_in_order():
    """On CuPy (any array module but NumPy) image work runs in sequential chunks of at most
    GPU_CHUNK_ROWS pixels; row-wise work (one row per item) runs as one call."""
    not_numpy = object()
    calls = []
    parallel.map_chunks(lambda start, stop: calls.append((start, stop)), 128, not_numpy, rows_per_item=32 * 32)
    per_chunk = parallel.GPU_CHUNK_ROWS // (32 * 32)
    assert calls == [(start, min(start + per_chunk, 128)) for start in range(0, 128, per_chunk)]
    assert len(calls) > 1
    calls.clear()
    parallel.map_chunks(lambda start, stop: calls.append((start, stop)), 100_000, not_numpy)
    assert calls == [(0, 100_000)]


@pytest.mark.parametrize("make", [Swish, lambda: GroupNorm(4, 8), lambda: GroupNormSwish(4, 8),
                                  lambda: GroupNormSwish(4, 8, keep_normalised=True)])
def test_forward_without_grad_gives_the_same_output(make):
    """Under no_grad, Swish and GroupNorm build their output without what backward needs."""
    x = np.random.default_rng(3).standard_normal((6, 16, 16, 8))
    layer = make()
    with_grad = layer(x)
    with no_grad():
        without = layer(x)
    np.testing.assert_array_equal(without, with_grad)


def test_group_norm_swish_is_the_two_layers_in_a_row():
    """Forward does the same arithmetic; backward recomputes the sigmoid, so it may round apart."""
    x = np.random.default_rng(6).standard_normal((6, 16, 16, 8))
    dout = np.random.default_rng(7).standard_normal(x.shape)
    norm, swish, fused = (layer.astype(np.float64) for layer in (GroupNorm(4, 8), Swish(), GroupNormSwish(4, 8)))
    np.testing.assert_array_equal(fused(x), swish(norm(x)))
    np.testing.assert_allclose(fused.backward(dout), norm.backward(swish.backward(dout)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fused.weight.grad, norm.weight.grad, rtol=1e-12)
    np.testing.assert_allclose(fused.bias.grad, norm.bias.grad, rtol=1e-12)


@pytest.mark.parametrize("grad", [True, False])
def test_inplace_swish_writes_over_its_input_and_changes_nothing_else(grad):
    x = np.random.default_rng(4).standard_normal((6, 16, 16, 8))
    dout = np.random.default_rng(5).standard_normal(x.shape)
    copying, inplace = Swish(), Swish(inplace=True)
    x_inplace = x.copy()
    with contextlib.nullcontext() if grad else no_grad():
        expected, out = copying(x), inplace(x_inplace)
    assert out is x_inplace
    np.testing.assert_array_equal(out, expected)
    if grad:
        np.testing.assert_array_equal(inplace.backward(dout), copying.backward(dout))


def test_scratch_reuses_a_buffer_per_thread_and_name():
    a = parallel.scratch("test a", (4, 5), np.float32)
    assert a.shape == (4, 5) and a.dtype == np.float32
    assert np.shares_memory(parallel.scratch("test a", (2, 3), np.float64), a)  # smaller: same memory
    assert not np.shares_memory(parallel.scratch("test b", (4, 5), np.float32), a)
    bigger = parallel.scratch("test a", (100, 100), np.float32)
    assert bigger.shape == (100, 100) and not np.shares_memory(bigger, a)  # grown
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as other:
        theirs = other.submit(parallel.scratch, "test a", (100, 100), np.float32).result()
    assert not np.shares_memory(theirs, bigger)
