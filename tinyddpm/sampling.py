"""Generating images: the example's ancestral DDPM sampler."""

import numpy as np

from tinyddpm.backend import get_array_module, to_device, to_host
from tinyddpm.diffusion import ancestral_step
from tinyddpm.nn import no_grad


def model_device(model):
    """The array module ``model``'s parameters live on."""
    return get_array_module(next(iter(model.parameters().values())).data)


def ancestral_sample(model, schedule, rng, num_images, display_every=0):
    """Run the sampler from pure noise down to t = 0.

    All noise is drawn on the host from ``rng`` (x_T first, then z for
    t = T..2), so a seed gives the same images on the CPU and the GPU.
    Returns ``(images, snapshots)``: the final (N, 32, 32, C) host array, and a
    list of ``(t, host images)`` at t = T and every ``display_every`` steps
    down to t = 0 (empty if ``display_every`` is 0).
    """
    xp = model_device(model)
    dtype = next(iter(model.parameters().values())).data.dtype
    shape = (num_images, 32, 32, model.config.channels)
    T = schedule.num_steps

    def noise():
        return to_device(rng.standard_normal(shape, dtype=np.float32).astype(dtype), xp)

    x = noise()
    snapshots = [(T, to_host(x))] if display_every else []
    with no_grad():
        for t in range(T, 0, -1):
            eps = model(x, np.full(num_images, t))
            x = ancestral_step(schedule, x, t, eps, noise() if t > 1 else None)
            if display_every and (t - 1) % display_every == 0:
                snapshots.append((t - 1, to_host(x)))
    return to_host(x), snapshots
