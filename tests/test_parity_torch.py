"""tinyddpm against the PyTorch reference (bench/torch_reference.py): same weights, same inputs,
same noise -> the same numbers.

The reference is itself checked against the independent golden forward pass
(test_reference_golden.py); here it stands in for autograd. Both networks get the seeded weights
of the golden rule (``seeded_state``), tinyddpm in channels-last layout at the boundary. Every
comparison is a relative error ||a - b|| / ||b|| per tensor: a correct float64 port lands near
1e-14 and a wrong one near 1e-3 or worse, so 1e-10 separates them with room on both sides.

One family of gradients is zero in exact arithmetic: the bias of an attention block's key
projection (adding b to every key adds q.b to a whole row of scores, which the softmax ignores).
Both implementations return rounding noise there, so those tensors are compared against the
scale of the block's other projection-bias gradients instead of against their own norm.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

# Imported after importorskip on purpose: without torch the module is skipped, not broken.
from bench.torch_reference import (
    ReferenceUNet,
    load_numpy_state,
    make_optimizer,
    make_schedule,
    mse_loss,
    sample,
    seeded_state,
)
from bench.torch_reference import train_step as reference_train_step
from tinyddpm.backend import to_device, to_host
from tinyddpm.diffusion import linear_schedule
from tinyddpm.nn import Conv2d, GroupNorm, GroupNormSwish, MSELoss, Parameter, no_grad
from tinyddpm.optim import Adam
from tinyddpm.sampling import ancestral_sample
from tinyddpm.train import train_step
from tinyddpm.unet import UNet, preset

F64_TOL = 1e-10  # float64, whole network
F32_TOL = 1e-4  # float32, whole network
ADAM_TOL = 1e-12  # float64, the optimiser alone


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x):
    return np.ascontiguousarray(x.detach().numpy().transpose(0, 2, 3, 1))


def rel_err(a, b, scale=None):
    """||a - b|| / ||b|| (or / ``scale``), in float64."""
    a, b = np.asarray(to_host(a), dtype=np.float64), np.asarray(to_host(b), dtype=np.float64)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) if scale is None else scale))


def make_pair(name, dtype, seed=1000, xp=np):
    """tinyddpm's (on the device of ``xp``) and the reference's network of preset ``name``,
    with the same seeded weights."""
    config = preset(name)
    reference = ReferenceUNet(config.channels, config.widths, config.emb_dim,
                              config.sinusoid_dim, config.groups)
    state = {k: v.astype(dtype) for k, v in seeded_state(reference, seed).items()}
    load_numpy_state(reference, state)
    model = UNet(config, rng=np.random.default_rng(0), dtype=dtype)
    model.load_state_dict(state)
    return model.to(xp), reference


def make_inputs(config, batch, dtype, seed):
    """Images (B, 32, 32, C), 1-based steps (B,) over the whole schedule, and a target (B, 32, 32, C)."""
    rng = np.random.default_rng(seed)
    shape = (batch, 32, 32, config.channels)
    x = rng.standard_normal(shape).astype(dtype)
    t = rng.integers(1, 501, size=batch)
    target = rng.standard_normal(shape).astype(dtype)
    return x, t, target


def gradient_errors(grads, reference_grads):
    """Relative error of every named gradient (see the module docstring for the key biases)."""
    errors = {}
    for name, g in grads.items():
        scale = None
        if name.endswith(".k.bias"):  # zero in exact arithmetic
            block = name[: -len("k.bias")]
            scale = max(np.linalg.norm(reference_grads[block + p]) for p in ("q.bias", "v.bias", "o.bias"))
        errors[name] = rel_err(g, reference_grads[name], scale)
    return errors


def parity_errors(model, reference, x, t, target, loss="projection", xp=np):
    """One forward and backward through both networks; relative error of the output and of every
    parameter gradient, keyed ``"out"`` and by parameter name (plus ``"loss"`` for the MSE).

    ``loss="projection"`` backpropagates the random projection ``sum(out * target)``;
    ``loss="mse"`` the example's loss against ``target`` as the true noise.
    """
    model.zero_grad()
    out = to_host(model(to_device(x, xp), t))
    reference.zero_grad(set_to_none=True)
    reference_out = reference(nchw(x), torch.from_numpy(t))
    errors = {"out": rel_err(out, nhwc(reference_out))}
    if loss == "projection":
        model.backward(to_device(target, xp))
        reference_out.backward(nchw(target))
    else:
        loss_fn = MSELoss()
        value = loss_fn(to_device(out, xp), to_device(target, xp))
        reference_value = mse_loss(reference_out, nchw(target))
        errors["loss"] = rel_err(float(value), reference_value.item())
        model.backward(loss_fn.backward())
        reference_value.backward()
    reference_grads = {n: p.grad.numpy() for n, p in reference.named_parameters()}
    grads = {n: to_host(p.grad) for n, p in model.parameters().items()}
    assert list(grads) == list(reference_grads)  # same names, same order
    errors.update(gradient_errors(grads, reference_grads))
    return errors


def assert_within(errors, tol):
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert max(errors.values()) <= tol, f"relative errors above {tol:g} (worst five): {worst}"


# ---------------------------------------------------------------------------------------------
# The network: forward output and every parameter gradient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["projection", "mse"])
def test_tiny_network_float64(xp, loss):
    model, reference = make_pair("tiny", np.float64, xp=xp)
    x, t, target = make_inputs(model.config, 3, np.float64, seed=1)
    assert_within(parity_errors(model, reference, x, t, target, loss, xp=xp), F64_TOL)


def test_example_network_float64(xp):
    model, reference = make_pair("example", np.float64, xp=xp)
    assert model.num_parameters() == 12_980_033
    x, t, target = make_inputs(model.config, 2, np.float64, seed=2)
    assert_within(parity_errors(model, reference, x, t, target, xp=xp), F64_TOL)


def test_example_network_float32(xp):
    model, reference = make_pair("example", np.float32, xp=xp)
    x, t, target = make_inputs(model.config, 4, np.float32, seed=3)
    errors = parity_errors(model, reference, x, t, target, xp=xp)
    assert all(p.grad.dtype == np.float32 for p in model.parameters().values())
    assert_within(errors, F32_TOL)


@pytest.mark.parametrize("layer", [GroupNorm, GroupNormSwish, Conv2d])
def test_parity_check_catches_a_wrong_backward(monkeypatch, layer):
    """Scale one layer type's input gradient by 1.001: the forward still agrees, the gradients
    of everything upstream of that layer no longer do, and the check fails loudly."""
    original = layer.backward

    def off_by_a_little(self, *grads):
        dx = original(self, *grads)
        if isinstance(dx, tuple):  # a conv with a per-sample shift: (dx, dshift)
            return (dx[0] * 1.001, *dx[1:])
        return None if dx is None else dx * 1.001

    monkeypatch.setattr(layer, "backward", off_by_a_little)
    model, reference = make_pair("tiny", np.float64)
    x, t, target = make_inputs(model.config, 2, np.float64, seed=4)
    errors = parity_errors(model, reference, x, t, target)
    assert errors["out"] <= F64_TOL
    assert errors["conv_out.weight"] <= F64_TOL  # nothing sits downstream of the last conv
    assert errors["fc1.weight"] > 1e4 * F64_TOL  # the time MLP sits upstream of everything
    with pytest.raises(AssertionError):
        assert_within(errors, F64_TOL)


# ---------------------------------------------------------------------------------------------
# Adam, the sampler and training
# ---------------------------------------------------------------------------------------------


def test_adam_matches_torch():
    """Five steps from the same gradients. The gradients span 1e-12 .. 1 in magnitude (and some
    are exactly zero) so that where eps enters the update matters."""
    rng = np.random.default_rng(5)
    shapes = {"conv.weight": (16, 8, 3, 3), "conv.bias": (16,), "fc.weight": (32, 16)}
    start = {n: rng.standard_normal(s) for n, s in shapes.items()}
    params = {n: Parameter(w.copy()) for n, w in start.items()}
    optimizer = Adam(params, lr=5e-4)
    reference = {n: torch.nn.Parameter(torch.from_numpy(w.copy())) for n, w in start.items()}
    reference_optimizer = torch.optim.Adam(reference.values(), lr=5e-4, betas=(0.9, 0.9999), eps=1e-8)
    for _ in range(5):
        for name, shape in shapes.items():
            g = rng.standard_normal(shape) * 10.0 ** rng.uniform(-12, 0, size=shape)
            g[rng.random(shape) < 0.05] = 0.0
            params[name].grad[...] = g
            reference[name].grad = torch.from_numpy(g.copy())
        optimizer.step()
        reference_optimizer.step()
        for name in shapes:
            ours, theirs = params[name].data, reference[name].detach().numpy()
            assert rel_err(ours, theirs) <= ADAM_TOL, name
            # The displacement from the start, a far more sensitive view of the same update.
            assert rel_err(ours - start[name], theirs - start[name]) <= 1e-9, name


def test_sampler_matches_torch():
    """tinyddpm draws x_T, then z for t = T .. 2, as float32 host normals; the reference is given
    the same arrays."""
    T, B, seed = 20, 3, 11
    model, reference = make_pair("tiny", np.float64)
    images, _ = ancestral_sample(model, linear_schedule(T), np.random.default_rng(seed), B)

    draws = np.random.default_rng(seed)
    noise = [draws.standard_normal((B, 32, 32, 1), dtype=np.float32).astype(np.float64) for _ in range(T)]
    reference_images = sample(reference.eval(), nchw(noise[0]), [nchw(z) for z in noise[1:]],
                              make_schedule(T))
    assert rel_err(images, nhwc(reference_images)) <= F64_TOL
    assert rel_err(images, noise[0]) > 0.1  # it did go somewhere


@pytest.mark.parametrize("name, dtype, batch, tol", [
    ("tiny", np.float64, 4, F64_TOL),
    ("example", np.float32, 2, F32_TOL),
])
def test_training_matches_torch(xp, name, dtype, batch, tol):
    """Five training steps (q_sample, forward, MSE, backward, Adam) on the same batches, steps
    and noise reach the same weights, and the trained networks predict the same noise.

    The key biases are left out of the weight comparison: their gradient is zero in exact
    arithmetic, so each implementation's is rounding noise, and Adam, which divides by
    sqrt(v) + eps, turns noise g into a step lr g / eps (float64: ~1e-8 of a normal step, a
    3e-10 relative weight difference in the tiny net; float32: ~0.3 of a normal step). The
    network cannot tell: the final forward comparison covers them.
    """
    model, reference = make_pair(name, dtype, xp=xp)
    optimizer, loss_fn, schedule = Adam(model.parameters(), lr=5e-4), MSELoss(), linear_schedule()
    reference_optimizer, reference_schedule = make_optimizer(reference), make_schedule()
    rng = np.random.default_rng(6)
    shape = (batch, 32, 32, model.config.channels)
    for _ in range(5):
        x0 = rng.uniform(-1, 1, shape).astype(dtype)
        t = rng.integers(1, 501, size=batch)
        noise = rng.standard_normal(shape).astype(dtype)
        loss = train_step(model, optimizer, loss_fn, schedule, to_device(x0, xp), t, to_device(noise, xp))
        reference_loss = reference_train_step(reference, reference_optimizer, nchw(x0),
                                              torch.from_numpy(t), nchw(noise), reference_schedule)
        assert rel_err(loss, reference_loss) <= tol
    ours = model.state_dict()
    theirs = {n: p.detach().numpy() for n, p in reference.state_dict().items()}
    assert_within({n: rel_err(ours[n], theirs[n]) for n in ours if not n.endswith(".k.bias")}, tol)

    x, t, _ = make_inputs(model.config, batch, dtype, seed=7)
    with torch.no_grad():
        reference_out = reference(nchw(x), torch.from_numpy(t))
    with no_grad():
        assert rel_err(to_host(model(to_device(x, xp), t)), nhwc(reference_out)) <= tol
