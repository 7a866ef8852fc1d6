"""Adam: one step worked by hand, several steps against torch.optim.Adam, and its state."""

import math

import numpy as np
import pytest

from tinyddpm.backend import to_host
from tinyddpm.nn import Parameter
from tinyddpm.optim import Adam


def test_first_step_by_hand(xp):
    p = Parameter(xp.asarray([1.0, -2.0, 0.5]))
    p.grad = xp.asarray([0.1, -0.3, 0.0])
    Adam({"p": p}, lr=0.01).step()
    # Step 1: m_hat = g and v_hat = g^2, so each weight moves by lr * g / (|g| + eps).
    g = np.array([0.1, -0.3, 0.0])
    expected = np.array([1.0, -2.0, 0.5]) - 0.01 * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(to_host(p.data), expected, rtol=1e-14)


def test_second_step_by_hand(xp):
    p = Parameter(xp.asarray([1.0]))
    adam = Adam({"p": p}, lr=0.1, beta1=0.5, beta2=0.75, eps=0.0)
    for g in (2.0, 4.0):
        p.grad = xp.asarray([g])
        adam.step()
    # After step 1: p = 1 - 0.1 = 0.9.  Step 2: m = 0.5*1 + 0.5*4 = 2.5 -> m_hat = 2.5/0.75;
    # v = 0.75*1 + 0.25*16 = 4.75 -> v_hat = 4.75/0.4375.
    expected = 0.9 - 0.1 * (2.5 / 0.75) / math.sqrt(4.75 / 0.4375)
    np.testing.assert_allclose(to_host(p.data), [expected], rtol=1e-14)


def test_matches_torch_adam(xp):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    shapes = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,)}
    params = {name: Parameter(xp.asarray(rng.standard_normal(shape))) for name, shape in shapes.items()}
    reference = {name: torch.tensor(to_host(p.data), requires_grad=True) for name, p in params.items()}
    ours = Adam(params)
    theirs = torch.optim.Adam(list(reference.values()), lr=5e-4, betas=(0.9, 0.9999), eps=1e-8)
    for _ in range(5):
        for name, p in params.items():
            g = rng.standard_normal(shapes[name]) * 1e-3
            p.grad = xp.asarray(g)
            reference[name].grad = torch.tensor(g)
        ours.step()
        theirs.step()
    for name, p in params.items():
        np.testing.assert_allclose(to_host(p.data), reference[name].detach().numpy(), rtol=1e-12, atol=1e-15)


def test_keeps_float32(xp):
    p = Parameter(xp.ones(3, dtype=np.float32))
    p.grad = xp.full(3, 0.5, dtype=np.float32)
    adam = Adam({"w": p})
    adam.step()
    assert p.data.dtype == adam.m["w"].dtype == adam.v["w"].dtype == np.float32


def make_params(xp):
    return {"a": Parameter(xp.zeros((2, 2))), "b": Parameter(xp.zeros(3))}


def test_state_dict_round_trip(xp):
    """An optimiser resumed from a state dict takes the same next step as the original."""
    params = make_params(xp)
    adam = Adam(params)
    for p in params.values():
        p.grad = xp.ones_like(p.data)
    adam.step()
    state = adam.state_dict()
    assert state["step"] == 1 and isinstance(state["m"]["a"], np.ndarray)

    resumed_params = make_params(xp)
    for name, p in resumed_params.items():
        p.data = params[name].data.copy()
    resumed = Adam(resumed_params)
    resumed.load_state_dict(state)
    for optimiser, ps in ((adam, params), (resumed, resumed_params)):
        for p in ps.values():
            p.grad = xp.full(p.data.shape, 0.5)
        optimiser.step()
    for name in params:
        np.testing.assert_array_equal(to_host(resumed_params[name].data), to_host(params[name].data))
    assert resumed.state_dict()["step"] == 2


def test_load_state_dict_rejects_mismatches(xp):
    state = Adam(make_params(xp)).state_dict()
    renamed = {**state, "m": {"a": state["m"]["a"], "c": state["m"]["b"]}}
    with pytest.raises(ValueError, match="names do not match"):
        Adam(make_params(xp)).load_state_dict(renamed)
    reshaped = {**state, "v": {"a": np.zeros((4,)), "b": state["v"]["b"]}}
    with pytest.raises(ValueError, match="has shape"):
        Adam(make_params(xp)).load_state_dict(reshaped)
