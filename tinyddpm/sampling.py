"""Generating images: the example's ancestral DDPM sampler, DDIM, and guidance.

All noise is drawn on the host from a NumPy generator (x_T first, then one z
per step that adds noise, in step order), so a seed gives the same images on
the CPU and the GPU, and two samplers fed the same generator see the same noise.
"""

import numpy as np
from tqdm import tqdm

from tinyddpm.backend import get_array_module, to_device, to_host
from tinyddpm.cuda_graph import CUDA_GRAPHS, CapturedForward, recorded_or_warn
from tinyddpm.diffusion import ancestral_step, ddim_sigma, ddim_step, ddim_timesteps
from tinyddpm.forward_workers import ForwardPool
from tinyddpm.nn import array_cache, frozen_weights, no_grad
from tinyddpm.nn.module import prepared_weight, weights_frozen
from tinyddpm.nn.parallel import map_batch


def forward_without_grad(model, x, steps, labels=None):
    """``model(x, steps, labels)`` under :func:`no_grad`.

    On the CPU each thread runs the whole network on its own slice of the batch
    (``parallel.map_batch``): the images of a forward pass without grad never meet, so the
    threads need not wait for each other after every layer. Inside ``frozen_weights()``, once
    such a pass is slow enough, the slices move to worker processes (``forward_workers.py``),
    which do not share one GIL. On the GPU, inside
    ``frozen_weights()``, the pass is recorded as a CUDA graph the first time it meets a
    batch shape and replayed after that (``cuda_graph.py``).
    """
    xp = get_array_module(x)
    if xp is not np and CUDA_GRAPHS and weights_frozen():
        key = ("forward graph", x.shape, x.dtype.str, labels is None)
        with no_grad():
            graph = prepared_weight(model, key, lambda _: recorded_or_warn(
                lambda: CapturedForward(model, x, steps, labels), "sampling", "the forward pass"))
            if graph is not None:
                return graph(x, steps, labels)

    def on_slice(start, stop):
        return model(x[start:stop], steps[start:stop], None if labels is None else labels[start:stop])

    with no_grad():
        if xp is np and weights_frozen():  # a sampling run: its passes may move to worker processes
            parts = prepared_weight(model, "forward pool", ForwardPool)(on_slice, len(x), x, steps, labels)
        else:
            parts = map_batch(on_slice, len(x), xp)
    return parts[0] if len(parts) == 1 else xp.concatenate(parts)


def predict_noise(model, x, t, labels=None, guidance=1.0):
    """The noise estimate at step ``t`` for every image in ``x``.

    With ``labels`` on a conditional network, classifier-free guidance mixes
    the conditional and unconditional estimates:
    ``eps = eps_uncond + guidance * (eps_cond - eps_uncond)``, so guidance 1 is
    the plain conditional model and 0 the unconditional one. Both estimates
    come from one forward pass over a doubled batch.
    """
    steps = np.full(len(x), t)
    if labels is None or guidance == 1.0:
        return forward_without_grad(model, x, steps, labels)
    null = np.full(len(x), model.null_label)
    if guidance == 0.0:
        return forward_without_grad(model, x, steps, null)
    xp = get_array_module(x)
    both = forward_without_grad(model, xp.concatenate([x, x]), np.concatenate([steps, steps]),
                                np.concatenate([labels, null]))
    eps_cond, eps_uncond = both[:len(x)], both[len(x):]
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def sample(model, schedule, rng, num_images, sampler="ddpm", steps=None, eta=0.0,
           labels=None, guidance=1.0, display_every=0, progress=False):
    """Run a sampler from pure noise down to t = 0.

    ``sampler`` is "ddpm" (the example's ancestral sampler, every step) or
    "ddim" (``steps`` evenly spaced steps, noise scale ``eta``). Returns
    ``(images, snapshots)``: the final (N, 32, 32, C) host array, and a list
    of ``(t, host images)`` at t = T, after every ``display_every`` sampler
    steps, and at t = 0 (empty if ``display_every`` is 0). ``progress`` shows a bar.
    """
    xp, dtype = model.array_module(), model.fc1.weight.data.dtype
    shape = (num_images, 32, 32, model.config.channels)
    T = schedule.num_steps
    if labels is not None:
        labels = np.broadcast_to(np.asarray(labels), (num_images,))

    def noise():
        return to_device(rng.standard_normal(shape, dtype=np.float32).astype(dtype), xp)

    if sampler == "ddpm":
        timesteps = np.arange(T, 0, -1)
    elif sampler == "ddim":
        timesteps = ddim_timesteps(T, steps or T)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose ddpm or ddim")

    x = noise()
    snapshots = [(T, to_host(x))] if display_every else []
    pairs = list(zip(timesteps, [*timesteps[1:], 0]))
    with no_grad(), frozen_weights(), array_cache():
        for i, (t, t_prev) in enumerate(tqdm(pairs, desc=f"{sampler} sampling", unit="step", disable=not progress,
                                             dynamic_ncols=True), start=1):
            eps = predict_noise(model, x, int(t), labels, guidance)
            if sampler == "ddpm":
                x = ancestral_step(schedule, x, int(t), eps, noise() if t > 1 else None)
            else:
                z = noise() if ddim_sigma(schedule, t, t_prev, eta) > 0 else None
                x = ddim_step(schedule, x, int(t), int(t_prev), eps, eta, z)
            if display_every and (i % display_every == 0 or t_prev == 0):
                snapshots.append((int(t_prev), to_host(x)))
    return to_host(x), snapshots


def ancestral_sample(model, schedule, rng, num_images, display_every=0, labels=None, guidance=1.0):
    """The example's sampler: every step, posterior variance, no clipping, no noise at t = 1."""
    return sample(model, schedule, rng, num_images, "ddpm", labels=labels, guidance=guidance,
                  display_every=display_every)
