"""Samplers and their options: DDIM against DDPM, guidance, EMA."""

import numpy as np
import pytest

from tinyddpm import sampling
from tinyddpm.diffusion import linear_schedule
from tinyddpm.ema import EMA
from tinyddpm.nn import Parameter, parallel
from tinyddpm.sampling import ancestral_sample, predict_noise, sample
from tinyddpm.unet import UNet, preset


@pytest.fixture(scope="module")
def tiny64():
    return UNet(preset("tiny"), rng=np.random.default_rng(0), dtype=np.float64)


def test_ddim_with_every_step_and_eta_1_is_the_ancestral_sampler(tiny64):
    schedule = linear_schedule(30)
    ddpm, ddpm_snaps = ancestral_sample(tiny64, schedule, np.random.default_rng(5), 3, display_every=10)
    ddim, ddim_snaps = sample(tiny64, schedule, np.random.default_rng(5), 3, "ddim", steps=30, eta=1.0,
                              display_every=10)
    np.testing.assert_allclose(ddim, ddpm, rtol=1e-9, atol=1e-9)
    assert [t for t, _ in ddim_snaps] == [t for t, _ in ddpm_snaps] == [30, 20, 10, 0]
    for (_, a), (_, b) in zip(ddim_snaps, ddpm_snaps):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def test_ddim_eta_0_is_deterministic_and_differs_from_ddpm(tiny64):
    schedule = linear_schedule(30)
    a, _ = sample(tiny64, schedule, np.random.default_rng(1), 2, "ddim", steps=10, eta=0.0)
    b, _ = sample(tiny64, schedule, np.random.default_rng(1), 2, "ddim", steps=10, eta=0.0)
    c, _ = ancestral_sample(tiny64, schedule, np.random.default_rng(1), 2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    assert np.isfinite(a).all()


def test_ddim_rejects_bad_step_counts(tiny64):
    with pytest.raises(ValueError, match="sampling steps"):
        sample(tiny64, linear_schedule(30), np.random.default_rng(0), 1, "ddim", steps=31)


def test_guidance_reduces_to_the_conditional_and_unconditional_models():
    config = preset("tiny")
    model = UNet(type(config)(**{**config.to_dict(), "widths": config.widths, "num_classes": 10}),
                 rng=np.random.default_rng(0), dtype=np.float64)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 32, 32, 1))
    labels = np.array([3, 7, 0, 9])
    t = np.full(4, 250)
    cond = model(x, t, labels)
    uncond = model(x, t, np.full(4, model.null_label))
    assert np.abs(cond - uncond).max() > 1e-6  # the label matters
    np.testing.assert_allclose(predict_noise(model, x, 250, labels, guidance=1.0), cond, rtol=1e-12)
    np.testing.assert_allclose(predict_noise(model, x, 250, labels, guidance=0.0), uncond, rtol=1e-12)
    np.testing.assert_allclose(predict_noise(model, x, 250, labels, guidance=3.0),
                               uncond + 3.0 * (cond - uncond), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model(x, t), uncond, rtol=1e-12)  # no labels: the "no label" row


@pytest.mark.parametrize("threads", [2, 3])
def test_the_sampler_forward_split_over_threads_is_the_whole_batch_forward(monkeypatch, threads):
    """forward_without_grad runs each thread's slice of the batch through the whole network."""
    config = preset("tiny")
    model = UNet(type(config)(**{**config.to_dict(), "widths": config.widths, "num_classes": 10}),
                 rng=np.random.default_rng(0), dtype=np.float64)
    rng = np.random.default_rng(3)
    x, t, labels = rng.standard_normal((7, 32, 32, 1)), rng.integers(1, 501, 7), rng.integers(0, 10, 7)
    monkeypatch.setattr(parallel, "THREADS", 1)
    whole = model(x, t, labels)
    monkeypatch.setattr(parallel, "THREADS", threads)
    sliced = []
    monkeypatch.setattr(sampling, "map_batch", lambda fn, n, xp: sliced.append(n) or parallel.map_batch(fn, n, xp))
    np.testing.assert_allclose(sampling.forward_without_grad(model, x, t, labels), whole, rtol=1e-12, atol=1e-12)
    assert sliced == [7]


def test_ema_arithmetic():
    p = Parameter(np.array([1.0, 2.0]))
    ema = EMA({"w": p}, decay=0.9)
    p.data[:] = [3.0, 4.0]
    ema.update()
    np.testing.assert_allclose(ema.averages["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 4])
    p.data[:] = [0.0, 0.0]
    ema.update()
    np.testing.assert_allclose(ema.averages["w"], [0.9 * 1.2, 0.9 * 2.2])
    restored = EMA({"w": p}, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    np.testing.assert_array_equal(restored.averages["w"], ema.averages["w"])
    with pytest.raises(ValueError):
        EMA({"w": p}, decay=1.0)


def test_a_graph_recording_that_fails_warns_and_gives_none():
    from tinyddpm.cuda_graph import recorded_or_warn

    def failing():
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line")

    with pytest.warns(RuntimeWarning, match=r"^sampling without a CUDA graph: recording the forward pass failed "
                                            r"\(RuntimeError: operation not permitted when stream is capturing$"):
        assert recorded_or_warn(failing, "sampling", "the forward pass") is None
    assert recorded_or_warn(lambda: "graph", "training", "the update") == "graph"
