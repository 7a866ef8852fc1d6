"""The array cache hands out the memory of dead arrays only, and changes no result."""

import numpy as np

from tinyddpm.diffusion import linear_schedule
from tinyddpm.nn import MSELoss, array_cache, memory
from tinyddpm.optim import Adam
from tinyddpm.train import train_step
from tinyddpm.unet import UNet, preset


def test_a_buffer_comes_back_only_when_nothing_refers_to_it(monkeypatch):
    monkeypatch.setattr(memory, "MIN_BYTES", 0)
    with array_cache():
        a = memory.empty((64, 64), np.float32)
        b = memory.empty((64, 64), np.float32)
        assert not np.shares_memory(a, b)
        view = a[3:, ::2]  # keeps a's buffer alive
        del a
        c = memory.empty((64, 64), np.float32)
        assert not np.shares_memory(c, view) and not np.shares_memory(c, b)
        del view
        d = memory.empty((32, 128), np.float32)  # the same size: a's buffer, free again
        assert not np.shares_memory(d, b) and not np.shares_memory(d, c)
        assert len(memory._buffers) == 3
    assert memory._buffers is None  # dropped with the block


def test_outside_a_block_arrays_are_plain_new_ones(monkeypatch):
    monkeypatch.setattr(memory, "MIN_BYTES", 0)
    a = memory.empty((8, 8), np.float32)
    assert a.base is None and a.flags.c_contiguous


def two_training_steps():
    model = UNet(preset("tiny"), rng=np.random.default_rng(0))
    optimizer, loss_fn, schedule = Adam(model.parameters()), MSELoss(), linear_schedule(50)
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (4, 32, 32, 1)).astype(np.float32)
    losses = []
    for _ in range(2):
        t = rng.integers(1, 51, size=4)
        noise = rng.standard_normal(x0.shape, dtype=np.float32)
        losses.append(float(train_step(model, optimizer, loss_fn, schedule, x0, t, noise)))
    return losses, {name: p.data.copy() for name, p in model.parameters().items()}


def test_training_inside_the_cache_is_bit_for_bit_the_same(monkeypatch):
    """Every layer's arrays from the cache (no size floor), second step on reused memory."""
    expected_losses, expected = two_training_steps()
    monkeypatch.setattr(memory, "MIN_BYTES", 0)
    with array_cache():
        losses, got = two_training_steps()
        assert len(memory._buffers) > 10
    assert losses == expected_losses
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
