"""The example's U-Net: its size, its wiring (against the golden forward pass) and its gradient."""

import numpy as np
import pytest

from bench.golden import default_golden_dir, golden_forward, golden_params, golden_state, seeded_named_state
from tinyddpm.gradcheck import BOUND, check_module
from tinyddpm.unet import UNet, preset

GOLDEN = default_golden_dir()
needs_golden = pytest.mark.skipif(not (GOLDEN / "example_net_forward.npz").is_file(),
                                  reason=f"golden files not found in {GOLDEN} (set TINYDDPM_SHARED)")


def nchw(a):
    return a.transpose(0, 3, 1, 2) if a.ndim == 4 else a


def test_example_network_size():
    model = UNet(preset("example"))
    assert model.num_parameters() == 12_980_033
    assert len(model.parameters()) == 274
    assert UNet(preset("example", channels=3)).num_parameters() == 12_983_491


@needs_golden
def test_names_and_shapes_match_the_spec_table():
    spec = [(p["name"], tuple(p["shape"])) for p in golden_params()["params"]]
    ours = [(name, p.data.shape) for name, p in UNet(preset("example")).named_parameters()]
    assert ours == spec


@pytest.fixture(scope="module")
def golden_run():
    model = UNet(preset("example"), dtype=np.float64)
    model.load_state_dict(golden_state())
    expected = golden_forward()
    intermediates = {}
    out = model(expected["x"].transpose(0, 2, 3, 1), expected["t"], intermediates=intermediates)
    return expected, out, intermediates


@needs_golden
@pytest.mark.parametrize("name", ["act_sinusoid", "act_time_embedding", "act_conv_in"]
                         + [f"act_r{i}" for i in range(1, 15)]
                         + [f"act_a{i}" for i in (3, 4, 7, 8, 11, 12)] + ["out"])
def test_golden_forward(golden_run, name):
    """Every block's output equals the independent float64 implementation to 1e-10."""
    expected, out, intermediates = golden_run
    ours = nchw(out if name == "out" else intermediates[name])
    error = np.linalg.norm(ours - expected[name]) / np.linalg.norm(expected[name])
    assert error < 1e-10, f"{name}: relative error {error:.2e}"


def test_full_network_gradient_check_at_reduced_width():
    """Float64 central differences through the whole tiny-preset graph (same topology)."""
    model = UNet(preset("tiny"), dtype=np.float64)
    shapes = {name: p.data.shape for name, p in model.named_parameters()}
    model.load_state_dict(seeded_named_state(shapes, {"up1.weight", "up2.weight"}))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 32, 1))
    t = np.array([3, 400])
    # The image input has no gradient; one direction per block (r1, a3, up1, ...).
    rows = check_module(model, [x, t], rng, wrt=(), group=lambda name: name.split(".")[0])
    assert len(rows) == 1 + len({name.split(".")[0] for name in shapes})
    worst = max(rows, key=lambda r: r.error)
    assert worst.error < BOUND, f"worst: {worst}"


def test_full_network_check_names_a_broken_block(monkeypatch):
    """Scaling one block's embedding gradient by 1.001 must fail the check, under that block's name."""
    from tinyddpm.unet import ResBlock

    model = UNet(preset("tiny"), rng=np.random.default_rng(1), dtype=np.float64)
    original = ResBlock.backward

    def broken(self, dout):
        dx, demb = original(self, dout)
        return dx, demb * 1.001 if self is model.r7 else demb

    monkeypatch.setattr(ResBlock, "backward", broken)
    rng = np.random.default_rng(0)
    rows = check_module(model, [rng.standard_normal((2, 32, 32, 1)), np.array([3, 400])], rng, wrt=(),
                        group=lambda name: name.split(".")[0])
    failed = {r.name for r in rows if r.error >= BOUND}
    assert "all" in failed or "fc1" in failed or "fc2" in failed
    assert {"fc1", "fc2"} & failed  # the time MLP receives the corrupted sum
    assert not {"r1", "r14", "conv_out"} & failed


def test_prepared_weights_are_made_once_inside_frozen_weights_only():
    from tinyddpm.nn.module import frozen_weights, prepared_weight

    made = []

    def double(w):
        made.append(w)
        return 2 * w

    w = np.ones(3)
    with frozen_weights():
        first = prepared_weight(w, "double", double)
        assert prepared_weight(w, "double", double) is first and len(made) == 1
        prepared_weight(w.copy(), "double", double)  # another array: made anew
        assert len(made) == 2
    prepared_weight(w, "double", double)  # outside the block nothing is kept
    assert len(made) == 3


@pytest.mark.parametrize("channels", [8, 128])  # im2col, and Winograd from 128 channels
def test_frozen_weights_give_the_same_outputs_and_see_a_replaced_weight(channels):
    from tinyddpm.nn import Conv2d, frozen_weights, no_grad

    rng = np.random.default_rng(0)
    conv = Conv2d(channels, 4, 3, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 6, 6, channels))
    with no_grad():
        expected = conv(x)
        with frozen_weights():
            assert np.array_equal(conv(x), expected) and np.array_equal(conv(x), expected)
            conv.weight.data = rng.standard_normal(conv.weight.data.shape)  # a new array is seen
            changed = conv(x)
        assert np.array_equal(conv(x), changed) and not np.allclose(changed, expected)
