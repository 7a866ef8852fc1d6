"""The diffusion maths of DDPM (Ho et al. 2020), kept apart from the network.

Steps are 1-based as in the MATLAB example: ``t`` runs over 1..T, and the
array entry for step ``t`` is at index ``t - 1``. The schedule is built once
in float64 on the host; per-batch coefficients are gathered there and cast to
the dtype (and device) of the images they scale.
"""

from dataclasses import dataclass

import numpy as np

from tinyddpm.backend import get_array_module


@dataclass(frozen=True)
class Schedule:
    """Named float64 arrays of length T; entry ``t - 1`` belongs to step ``t``."""

    betas: np.ndarray  # beta_t
    alphas: np.ndarray  # 1 - beta_t
    alpha_bars: np.ndarray  # prod_{s <= t} alpha_s
    alpha_bars_prev: np.ndarray  # alpha_bar_{t-1}, with alpha_bar_0 = 1
    posterior_variance: np.ndarray  # beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)

    @property
    def num_steps(self):
        return len(self.betas)


def linear_schedule(num_steps=500, beta_start=1e-4, beta_end=0.02):
    """The example's schedule: ``linspace(1e-4, 0.02, 500)``."""
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    alphas = 1.0 - betas
    alpha_bars = np.cumprod(alphas)
    alpha_bars_prev = np.concatenate([[1.0], alpha_bars[:-1]])
    posterior_variance = betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars)
    return Schedule(betas, alphas, alpha_bars, alpha_bars_prev, posterior_variance)


def _per_image(values, like):
    """Host float64 values, one per image, as a (N, 1, 1, 1) array matching ``like``."""
    xp = get_array_module(like)
    column = np.asarray(values).reshape(-1, *([1] * (like.ndim - 1)))
    return xp.asarray(column.astype(like.dtype))


def sample_timesteps(rng, batch_size, num_steps):
    """Steps drawn uniformly from {1, ..., T}."""
    return rng.integers(1, num_steps + 1, size=batch_size)


def q_sample(schedule, x0, t, noise):
    """Noise clean images to step ``t`` in closed form (Ho et al., eq. 4):

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    """
    alpha_bar = schedule.alpha_bars[np.asarray(t) - 1]
    return _per_image(np.sqrt(alpha_bar), x0) * x0 + _per_image(np.sqrt(1.0 - alpha_bar), x0) * noise


def ancestral_step(schedule, x_t, t, eps, z):
    """One step of the example's sampler (Ho et al., Algorithm 2), all images at step ``t``:

    x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sqrt(var_t) z

    with var_t the posterior variance and no clipping. ``z`` is ignored at t = 1,
    where the sampler adds no noise.
    """
    i = t - 1
    eps_scale = float(schedule.betas[i] / np.sqrt(1.0 - schedule.alpha_bars[i]))
    mean = (x_t - eps_scale * eps) * float(1.0 / np.sqrt(schedule.alphas[i]))
    if t == 1:
        return mean
    return mean + float(np.sqrt(schedule.posterior_variance[i])) * z


def ddim_timesteps(num_steps, sampling_steps):
    """``sampling_steps`` steps from T down to 1, evenly spaced (all of them when equal to T)."""
    if not 1 <= sampling_steps <= num_steps:
        raise ValueError(f"sampling steps must be in 1..{num_steps}, got {sampling_steps}")
    return np.unique(np.round(np.linspace(1, num_steps, sampling_steps)).astype(int))[::-1]


def ddim_sigma(schedule, t, t_prev, eta):
    """DDIM's noise scale (Song et al. 2021, eq. 16); eta = 1 gives DDPM's posterior std."""
    ab = schedule.alpha_bars[t - 1]
    ab_prev = schedule.alpha_bars[t_prev - 1] if t_prev > 0 else 1.0
    return eta * np.sqrt((1.0 - ab_prev) / (1.0 - ab)) * np.sqrt(1.0 - ab / ab_prev)


def ddim_step(schedule, x_t, t, t_prev, eps, eta, z):
    """One DDIM step from ``t`` to ``t_prev`` (0 is the end), Song et al. 2021, eq. 12:

    x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z

    With every step taken and eta = 1 this is the ancestral step; eta = 0 is deterministic.
    ``z`` is ignored where sigma is 0.
    """
    ab = schedule.alpha_bars[t - 1]
    ab_prev = schedule.alpha_bars[t_prev - 1] if t_prev > 0 else 1.0
    sigma = ddim_sigma(schedule, t, t_prev, eta)
    x0 = (x_t - float(np.sqrt(1.0 - ab)) * eps) * float(1.0 / np.sqrt(ab))
    x_prev = float(np.sqrt(ab_prev)) * x0 + float(np.sqrt(max(1.0 - ab_prev - sigma**2, 0.0))) * eps
    if sigma > 0:
        x_prev = x_prev + float(sigma) * z
    return x_prev
