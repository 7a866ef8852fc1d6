"""CUDA graphs (cuda_graph.py): a replayed sampling pass or training update is the eager one on the new inputs."""

import warnings

import numpy as np
import pytest

from tinyddpm import cuda_graph, sampling
from tinyddpm.backend import array_module, gpu_unavailable_reason
from tinyddpm.diffusion import linear_schedule
from tinyddpm.nn import MSELoss, frozen_weights
from tinyddpm.optim import Adam
from tinyddpm.train import TrainStep, train_step
from tinyddpm.unet import UNet, preset

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(gpu_unavailable_reason() is not None, reason=f"gpu: {gpu_unavailable_reason()}")]


def conditional_tiny(dtype):
    config = preset("tiny")
    model = UNet(type(config)(**{**config.to_dict(), "widths": config.widths, "num_classes": 10}),
                 rng=np.random.default_rng(0), dtype=dtype)
    return model.to(array_module("gpu"))


def inputs(seed, n=5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 32, 32, 1)), rng.integers(1, 501, n), rng.integers(0, 10, n)


def test_a_replay_is_the_eager_pass_on_the_new_inputs():
    from tinyddpm.cuda_graph import CapturedForward

    cupy = array_module("gpu")
    model = conditional_tiny(np.float64)
    x, t, labels = inputs(1)
    with frozen_weights():
        graph = CapturedForward(model, cupy.asarray(x), t, labels)
        x2, t2, labels2 = inputs(2)
        replayed = graph(cupy.asarray(x2), t2, labels2)
        eager = model(cupy.asarray(x2), t2, labels2)
        np.testing.assert_allclose(cupy.asnumpy(replayed), cupy.asnumpy(eager), rtol=1e-12, atol=1e-12)
        kept = replayed.copy()
        x3, t3, labels3 = inputs(3)
        graph(cupy.asarray(x3), t3, labels3)
        np.testing.assert_array_equal(cupy.asnumpy(replayed), cupy.asnumpy(kept))  # each call returns its own array


def test_the_sampler_gives_the_same_images_with_and_without_graphs(monkeypatch):
    model = conditional_tiny(np.float32)
    captured = []

    class CountedForward(sampling.CapturedForward):
        def __init__(self, *args):
            captured.append(args[1].shape)
            super().__init__(*args)

    monkeypatch.setattr(sampling, "CapturedForward", CountedForward)

    def images():
        return sampling.sample(model, linear_schedule(50), np.random.default_rng(4), 3, "ddim", steps=6,
                               labels=[1, 4, 7], guidance=2.0)[0]

    monkeypatch.setattr(sampling, "CUDA_GRAPHS", False)
    eager = images()
    monkeypatch.setattr(sampling, "CUDA_GRAPHS", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture that fails and falls back is a failure here
        graphed = images()
    assert captured == [(6, 32, 32, 1)]  # one graph (guidance doubles the batch), replayed at every step
    np.testing.assert_allclose(graphed, eager, rtol=1e-5, atol=1e-5)


def test_a_sampling_run_gives_its_graph_memory_back(monkeypatch):
    import gc

    cupy = array_module("gpu")
    model = conditional_tiny(np.float32)
    graphs = []

    class KeptForward(sampling.CapturedForward):
        def __init__(self, *args):
            super().__init__(*args)
            graphs.append(self.pool.total_bytes())

    monkeypatch.setattr(sampling, "CapturedForward", KeptForward)

    def free_bytes_after_sampling():
        sampling.sample(model, linear_schedule(50), np.random.default_rng(4), 3, "ddim", steps=3, labels=[1, 4, 7])
        gc.collect()
        cupy.get_default_memory_pool().free_all_blocks()
        return cupy.cuda.runtime.memGetInfo()[0]

    before = free_bytes_after_sampling()
    after = [free_bytes_after_sampling() for _ in range(3)][-1]
    assert len(graphs) == 4 and graphs[0] > 0
    assert before - after < graphs[0]  # three runs' graph pools did not stay behind


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_capture_blas_products_equal_cupys(dtype):
    from tinyddpm.nn.cublas import CaptureBlas

    cupy = array_module("gpu")
    rng = np.random.default_rng(5)

    def device(*shape):
        return cupy.asarray(rng.standard_normal(shape).astype(dtype))

    cases = [(device(70, 30), device(30, 20)), (device(70, 30), device(20, 30).T),
             (device(30, 70).T, device(30, 20)), (device(90, 30)[10:80], device(30, 20)),
             (device(4, 1, 64, 16), device(4, 64, 1, 16).transpose(0, 2, 3, 1)),
             (device(4, 2, 64, 16), device(4, 64, 2, 16).transpose(0, 2, 3, 1)),
             (cupy.broadcast_to(device(1, 1, 64), (4, 1, 64)), device(4, 64, 16))]  # conv.pixel_sums' ones
    stream = cupy.cuda.Stream(non_blocking=True)
    blas = CaptureBlas().bind(stream)
    try:
        with stream:
            for a, b in cases:
                got = blas.matmul(a, b)
                stream.synchronize()
                np.testing.assert_allclose(cupy.asnumpy(got), cupy.asnumpy(cupy.matmul(a, b)),
                                           rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
    finally:
        blas.close()


@pytest.mark.parametrize("conditional", [False, True])
def test_a_replayed_training_update_is_the_eager_one(monkeypatch, conditional):
    """Four updates recorded once and replayed against four eager ones, from the same weights:
    the same losses, weights and Adam moments. A replay that read a recorded input, or the
    step size of the step it was recorded at, would differ from the second update on."""
    cupy = array_module("gpu")
    monkeypatch.setattr(cuda_graph, "CUDA_GRAPHS", True)
    schedule = linear_schedule(50)

    def trainer():
        model = conditional_tiny(np.float64)
        return model, Adam(model.parameters(), lr=1e-3)

    graphed_model, graphed_adam = trainer()
    eager_model, eager_adam = trainer()
    update = TrainStep(graphed_model, graphed_adam, MSELoss(), schedule)
    rng = np.random.default_rng(6)
    for step in range(4):
        x0 = cupy.asarray(rng.standard_normal((5, 32, 32, 1)))
        noise = cupy.asarray(rng.standard_normal((5, 32, 32, 1)))
        t = rng.integers(1, 51, 5)
        labels = np.where(rng.random(5) < 0.3, 10, rng.integers(0, 10, 5)) if conditional else None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a recording that fails and falls back is a failure here
            graphed = update(x0, t, noise, labels)
        eager = train_step(eager_model, eager_adam, MSELoss(), schedule, x0, t, noise, labels)
        assert update.graph is not None
        np.testing.assert_allclose(float(graphed), float(eager), rtol=1e-10)
    assert graphed_adam.step_count == eager_adam.step_count == 4
    for (name, p), (_, q) in zip(graphed_model.named_parameters(), eager_model.named_parameters()):
        if name.endswith(".k.bias"):
            # Its exact gradient is 0 (softmax ignores a shift of each query's scores), so Adam
            # turns the products' rounding, which may differ between cuBLAS handles, into +-lr.
            np.testing.assert_allclose(cupy.asnumpy(p.data), cupy.asnumpy(q.data), atol=2 * 4 * 1e-3, err_msg=name)
            continue
        for a, b in ((p.data, q.data), (graphed_adam.m[name], eager_adam.m[name]),
                     (graphed_adam.v[name], eager_adam.v[name])):
            np.testing.assert_allclose(cupy.asnumpy(a), cupy.asnumpy(b), rtol=1e-9, atol=1e-12, err_msg=name)
