"""Worker processes run a sampler's passes with the threads' results, fail with a clear error,
and end with their ``frozen_weights()`` block."""

import io
import pickle
import warnings

import numpy as np
import pytest

from tinyddpm import forward_workers
from tinyddpm.forward_workers import ForwardPool, SliceWorkers, WorkerError
from tinyddpm.nn import Parameter, frozen_weights, no_grad, parallel
from tinyddpm.nn.module import prepared_weight
from tinyddpm.sampling import forward_without_grad
from tinyddpm.unet import UNet, preset


@pytest.fixture(scope="module")
def model():
    return UNet(preset("tiny"), np.random.default_rng(0)).astype(np.float64)


def batch(n, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 32, 32, 1)), rng.integers(1, 500, n)


def own_slice(start, stop):
    return ("the caller's slice", start, stop)


def test_a_slow_pass_moves_the_next_ones_to_workers(monkeypatch, model):
    monkeypatch.setattr(parallel, "THREADS", 3)
    monkeypatch.setattr(forward_workers, "MIN_PASS_SECONDS", 0.0)
    x, t = batch(5)
    with no_grad():
        expected = model(x, t)
    with frozen_weights():
        on_threads = forward_without_grad(model, x, t)
        pool = prepared_weight(model, "forward pool", ForwardPool)
        assert pool.workers is None
        on_workers = forward_without_grad(model, x[::-1], t[::-1])[::-1]
        processes = list(pool.workers.processes)
        assert len(processes) == 2 and all(p.poll() is None for p in processes)
        del pool
    np.testing.assert_allclose(on_threads, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(on_workers, expected, rtol=1e-12, atol=1e-14)
    assert [p.wait(timeout=10) for p in processes] == [0, 0]  # the block's end closed their input


def test_fast_passes_stay_on_threads(monkeypatch, model):
    monkeypatch.setattr(parallel, "THREADS", 2)
    monkeypatch.setattr(forward_workers, "MIN_PASS_SECONDS", 1e9)
    x, t = batch(4)
    with frozen_weights():
        for _ in range(3):
            forward_without_grad(model, x, t)
        assert prepared_weight(model, "forward pool", ForwardPool).workers is None


def test_a_worker_error_names_the_worker_and_the_cause(model):
    workers = SliceWorkers(model, 1)
    try:
        x, t = batch(4)
        two_channels = np.zeros((4, 32, 32, 2))  # the network takes one
        with pytest.raises(WorkerError, match=r"forward worker \d+ failed: ValueError"):
            workers(own_slice, 4, two_channels, t, None)
        # the worker still serves, in step
        mine, theirs = workers(own_slice, 4, x, t, None)
        assert mine == ("the caller's slice", 0, 2)
        with no_grad():
            np.testing.assert_allclose(theirs, model(x[2:], t[2:]), rtol=1e-12, atol=1e-14)
    finally:
        workers.close()


def test_a_dead_worker_is_reported(model):
    workers = SliceWorkers(model, 1)
    try:
        workers.processes[0].kill()
        workers.processes[0].wait()
        x, t = batch(2)
        with pytest.raises(WorkerError, match=r"forward worker \d+ exited with code -9"):
            workers(own_slice, 2, x, t, None)
    finally:
        workers.close()


def test_a_garbled_reply_stops_the_worker(model):
    workers = SliceWorkers(model, 1)
    try:
        worker = workers.processes[0]
        worker.stdout = io.BytesIO(b"not a pickle")  # what the parent reads in place of the reply
        x, t = batch(2)
        with pytest.raises(WorkerError, match=r"forward worker \d+ sent a reply that could not be read .*code -9"):
            workers(own_slice, 2, x, t, None)
        assert worker.poll() == -9
    finally:
        workers.close()


def test_workers_that_cannot_start_leave_the_passes_on_threads(monkeypatch, model):
    def cannot_start(model, count):
        raise OSError("no processes here")

    monkeypatch.setattr(parallel, "THREADS", 2)
    monkeypatch.setattr(forward_workers, "MIN_PASS_SECONDS", 0.0)
    monkeypatch.setattr(forward_workers, "SliceWorkers", cannot_start)
    x, t = batch(2)
    with no_grad():
        expected = model(x, t)
    with frozen_weights():
        forward_without_grad(model, x, t)
        with pytest.warns(RuntimeWarning, match="without worker processes: no processes here"):
            out = forward_without_grad(model, x, t)
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-14)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second try, so no second warning
            forward_without_grad(model, x, t)


def test_a_network_that_cannot_be_sent_stays_on_threads(monkeypatch):
    model = UNet(preset("tiny"), np.random.default_rng(0)).astype(np.float64)
    model.note = lambda: None  # pickle refuses a local function
    monkeypatch.setattr(parallel, "THREADS", 2)
    monkeypatch.setattr(forward_workers, "MIN_PASS_SECONDS", 0.0)
    x, t = batch(2)
    with frozen_weights():
        forward_without_grad(model, x, t)
        with pytest.warns(RuntimeWarning, match="sampling on threads, without worker processes: .*pickle"):
            forward_without_grad(model, x, t)
        assert prepared_weight(model, "forward pool", ForwardPool).workers is None


def test_a_pickled_parameter_keeps_its_value_and_starts_with_no_gradient():
    param = Parameter(np.arange(6.0).reshape(2, 3))
    param.grad += 5
    copy = pickle.loads(pickle.dumps(param))
    np.testing.assert_array_equal(copy.data, param.data)
    np.testing.assert_array_equal(copy.grad, np.zeros((2, 3)))
