"""The schedule, the forward process and one sampler step, against the formulas."""

import numpy as np
import pytest

from tinyddpm.diffusion import ancestral_step, linear_schedule, q_sample, sample_timesteps


def test_schedule_matches_the_example():
    s = linear_schedule()
    assert s.num_steps == 500
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    assert s.alpha_bars[0] == pytest.approx(1 - 1e-4, rel=1e-15)
    # prod_{t=1}^{500} (1 - beta_t), computed independently in closed steps
    expected = np.prod(1 - np.linspace(1e-4, 0.02, 500))
    assert s.alpha_bars[-1] == pytest.approx(expected, rel=1e-12)
    assert s.alpha_bars[-1] == pytest.approx(0.0063527, rel=1e-4)
    assert s.alpha_bars_prev[0] == 1.0 and s.alpha_bars_prev[1] == s.alpha_bars[0]
    assert s.posterior_variance[0] == 0.0
    t = 250
    assert s.posterior_variance[t - 1] == pytest.approx(
        s.betas[t - 1] * (1 - s.alpha_bars[t - 2]) / (1 - s.alpha_bars[t - 1]), rel=1e-14)


def test_timesteps_are_one_based_and_cover_the_range():
    t = sample_timesteps(np.random.default_rng(0), 20000, 500)
    assert t.min() == 1 and t.max() == 500


def test_q_sample_is_the_closed_form():
    s = linear_schedule()
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (3, 32, 32, 1)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([1, 250, 500])
    xt = q_sample(s, x0, t, eps)
    assert xt.dtype == np.float32
    for i, ti in enumerate(t):
        ab = s.alpha_bars[ti - 1]
        np.testing.assert_allclose(xt[i], np.sqrt(ab) * x0[i] + np.sqrt(1 - ab) * eps[i], rtol=1e-5, atol=1e-6)
    # at t = 500 almost all signal is gone: x_t is close to the noise
    assert np.corrcoef(xt[2].ravel(), eps[2].ravel())[0, 1] > 0.99


@pytest.mark.parametrize("t", [500, 123, 2, 1])
def test_ancestral_step_matches_the_example_formula(t):
    s = linear_schedule()
    rng = np.random.default_rng(t)
    x, eps, z = (rng.standard_normal((2, 32, 32, 1)) for _ in range(3))
    beta, ab, ab_prev = s.betas[t - 1], s.alpha_bars[t - 1], (s.alpha_bars[t - 2] if t > 1 else 1.0)
    var = beta * (1 - ab_prev) / (1 - ab)
    expected = (x - beta / np.sqrt(1 - ab) * eps) / np.sqrt(1 - beta) + (np.sqrt(var) * z if t > 1 else 0)
    np.testing.assert_allclose(ancestral_step(s, x, t, eps, z), expected, rtol=1e-13)


def test_ancestral_step_keeps_float32():
    s = linear_schedule()
    x = np.ones((1, 32, 32, 1), np.float32)
    assert ancestral_step(s, x, 10, x, x).dtype == np.float32
