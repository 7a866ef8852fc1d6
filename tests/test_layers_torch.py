"""Each layer's forward and every gradient against PyTorch, in float64, to 1e-10 relative.

Images are channels-last (N, H, W, C) in tinyddpm and channels-first in torch;
the torch side of each case transposes at its boundary. Weights are shared as
is: both use the PyTorch layouts.
"""

import math

import numpy as np
import pytest

from tinyddpm.backend import to_device, to_host
from tinyddpm.nn import (
    BroadcastAdd,
    Concat,
    Conv2d,
    ConvTranspose2d,
    GroupNorm,
    GroupNormSwish,
    Linear,
    MSELoss,
    ScaledDotProductAttention,
    SelfAttention,
    Swish,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOLERANCE = 1e-10


def nchw(x):
    return x.permute(0, 3, 1, 2)


def nhwc(x):
    return x.permute(0, 2, 3, 1)


def assert_close(ours, theirs, what):
    """Max error relative to the largest expected value, or to 1 for a gradient that is
    zero in exact arithmetic (the key bias under softmax): every value here is O(1)."""
    ours, theirs = to_host(ours), theirs.detach().numpy()
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    error = np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1.0)
    assert error < TOLERANCE, f"{what}: relative error {error:.2e}"


def check_against_torch(xp, module, inputs, torch_forward, wrt=None, seed=0):
    """Run ``module`` and ``torch_forward(*inputs, **params)`` on the same float64 values.

    Compares the outputs, the gradients of the inputs listed in ``wrt`` (default: all)
    and of every parameter, for one random output gradient.
    """
    rng = np.random.default_rng(seed)
    wrt = range(len(inputs)) if wrt is None else wrt
    for _, param in module.named_parameters():  # random values, biases and GN shifts included
        param.data = rng.standard_normal(param.data.shape)
    module.astype(np.float64).to(xp)
    params = {name: torch.tensor(to_host(p.data), requires_grad=True) for name, p in module.parameters().items()}
    torch_inputs = [torch.tensor(a, requires_grad=i in wrt) for i, a in enumerate(inputs)]

    out = module(*[to_device(a, xp) for a in inputs])
    expected = torch_forward(*torch_inputs, **{name.replace(".", "_"): p for name, p in params.items()})
    assert_close(np.asarray(to_host(out)), expected, "forward")

    dout = rng.standard_normal(np.shape(out))
    grads = module.backward(to_device(dout, xp) if np.ndim(out) else float(dout))
    grads = grads if isinstance(grads, tuple) else (grads,)
    expected.backward(torch.tensor(dout))
    for i in wrt:
        assert_close(grads[i], torch_inputs[i].grad, f"gradient of input {i}")
    for name, param in module.parameters().items():
        assert_close(param.grad, params[name].grad, f"gradient of {name}")


def randn(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


def test_conv3x3_stride1(xp):
    check_against_torch(xp, Conv2d(3, 5, 3), [randn(2, 7, 6, 3)],
                        lambda x, weight, bias: nhwc(F.conv2d(nchw(x), weight, bias, padding=1)))


def test_conv3x3_stride2_pads_bottom_right(xp):
    check_against_torch(xp, Conv2d(3, 5, 3, stride=2), [randn(2, 8, 6, 3)],
                        lambda x, weight, bias: nhwc(F.conv2d(F.pad(nchw(x), (0, 1, 0, 1)), weight, bias, stride=2)))


@pytest.mark.parametrize("stride, pad", [(1, (1, 1, 1, 1)), (2, (0, 1, 0, 1))])
def test_conv3x3_with_few_output_channels(xp, stride, pad):
    """9 * 2 <= 20 input channels: the per-tap road (conv.correlate_taps)."""
    check_against_torch(xp, Conv2d(20, 2, 3, stride=stride), [randn(2, 6, 8, 20)],
                        lambda x, weight, bias: nhwc(F.conv2d(F.pad(nchw(x), pad), weight, bias, stride=stride)))


def test_conv1x1(xp):
    check_against_torch(xp, Conv2d(4, 3, 1), [randn(2, 5, 6, 4)],
                        lambda x, weight, bias: nhwc(F.conv2d(nchw(x), weight, bias)))


def test_conv_without_input_gradient(xp):
    conv = Conv2d(3, 4, 3)
    conv.needs_input_grad = False
    conv.to(xp)
    conv(xp.asarray(randn(1, 4, 4, 3), dtype=np.float32))
    assert conv.backward(xp.ones((1, 4, 4, 4), dtype=np.float32)) is None
    assert float(abs(conv.weight.grad).sum()) > 0


def test_conv_transpose_is_cropped_to_twice_the_size(xp):
    def reference(x, weight, bias):
        full = F.conv_transpose2d(nchw(x), weight, bias, stride=2)  # (2H+1) x (2W+1)
        H, W = x.shape[1:3]
        return nhwc(full[:, :, :2 * H, :2 * W])
    check_against_torch(xp, ConvTranspose2d(4, 3), [randn(2, 3, 5, 4)], reference)


def test_group_norm_image(xp):
    check_against_torch(xp, GroupNorm(3, 12), [randn(2, 4, 5, 12)],
                        lambda x, weight, bias: nhwc(F.group_norm(nchw(x), 3, weight, bias, eps=1e-5)))


def test_group_norm_vector(xp):
    check_against_torch(xp, GroupNorm(4, 32), [randn(3, 32)],
                        lambda x, weight, bias: F.group_norm(x, 4, weight, bias, eps=1e-5))


def test_group_norm_swish(xp):
    check_against_torch(xp, GroupNormSwish(3, 12), [randn(2, 4, 5, 12)],
                        lambda x, weight, bias: F.silu(nhwc(F.group_norm(nchw(x), 3, weight, bias, eps=1e-5))))


def test_group_norm_swish_with_its_normalised_output(xp):
    """keep_normalised: forward returns (normalised, out) and backward takes both gradients."""
    rng = np.random.default_rng(2)
    layer = GroupNormSwish(3, 12, keep_normalised=True).astype(np.float64)
    layer.weight.data, layer.bias.data = rng.standard_normal(12), rng.standard_normal(12)
    layer.to(xp)
    x = randn(2, 4, 5, 12)
    dout, dnormalised = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    weight, bias = (torch.tensor(to_host(p.data), requires_grad=True) for p in (layer.weight, layer.bias))
    torch_x = torch.tensor(x, requires_grad=True)
    torch_normalised = nhwc(F.group_norm(nchw(torch_x), 3, weight, bias, eps=1e-5))
    torch_out = F.silu(torch_normalised)

    normalised, out = layer(to_device(x, xp))
    assert_close(normalised, torch_normalised, "normalised")
    assert_close(out, torch_out, "forward")
    dx = layer.backward(to_device(dout, xp), to_device(dnormalised, xp))
    (torch_out * torch.tensor(dout) + torch_normalised * torch.tensor(dnormalised)).sum().backward()
    assert_close(dx, torch_x.grad, "gradient of x")
    assert_close(layer.weight.grad, weight.grad, "gradient of weight")
    assert_close(layer.bias.grad, bias.grad, "gradient of bias")


def test_swish(xp):
    check_against_torch(xp, Swish(), [8 * randn(3, 4, 5)], F.silu)


def test_swish_does_not_overflow(xp):
    out = Swish()(xp.asarray([-1e4, 1e4], dtype=np.float32))
    np.testing.assert_array_equal(to_host(out), [0, 1e4])


def test_linear_with_leading_dims(xp):
    check_against_torch(xp, Linear(5, 3), [randn(2, 4, 5)], F.linear)


def torch_attention(q, k, v, heads):
    N, L, C = q.shape
    D = C // heads

    def split(a):
        return a.reshape(N, L, heads, D).transpose(1, 2)

    p = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(D), dim=-1)
    return (p @ split(v)).transpose(1, 2).reshape(N, L, C)


@pytest.mark.parametrize("heads", [1, 4])
def test_attention(xp, heads):
    q, k, v = (3 * randn(2, 6, 8, seed=s) for s in (1, 2, 3))
    check_against_torch(xp, ScaledDotProductAttention(heads), [q, k, v],
                        lambda q, k, v: torch_attention(q, k, v, heads))


def test_self_attention(xp):
    def reference(s, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias):
        a = torch_attention(F.linear(s, q_weight, q_bias), F.linear(s, k_weight, k_bias),
                            F.linear(s, v_weight, v_bias), heads=2)
        return F.linear(a, o_weight, o_bias)
    check_against_torch(xp, SelfAttention(8, num_heads=2), [randn(2, 6, 8)], reference)


def test_concat(xp):
    check_against_torch(xp, Concat(), [randn(2, 3, 3, 2, seed=1), randn(2, 3, 3, 5, seed=2)],
                        lambda a, b: torch.cat([a, b], dim=-1))


def test_broadcast_add(xp):
    check_against_torch(xp, BroadcastAdd(), [randn(2, 3, 4, 5, seed=1), randn(2, 5, seed=2)],
                        lambda h, e: h + e[:, None, None, :])


def test_mse_loss_is_matlab_mse(xp):
    pred, target = randn(4, 3, 3, 1, seed=1), randn(4, 3, 3, 1, seed=2)
    check_against_torch(xp, MSELoss(), [pred, target],
                        lambda p, t: ((p - t) ** 2).sum() / (2 * p.shape[0]), wrt=[0])
    loss = MSELoss()(xp.asarray(pred), xp.asarray(target))
    if xp is not np:
        assert isinstance(loss, xp.ndarray) and loss.shape == ()  # left on the device: no wait for it
    np.testing.assert_allclose(float(loss), ((pred - target) ** 2).sum() / 8, rtol=1e-12)


def test_float32_stays_float32(xp):
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((2, 4, 4, 8)), dtype=np.float32)
    layers = [Conv2d(8, 8, 3, rng=rng), Conv2d(8, 8, 3, stride=2, rng=rng), Conv2d(8, 8, 1, rng=rng),
              ConvTranspose2d(8, 8, rng=rng), GroupNorm(2, 8), Swish(), Linear(8, 8, rng=rng)]
    for layer in layers:
        layer.to(xp)
        out = layer(x)
        dx = layer.backward(xp.ones_like(out))
        assert out.dtype == dx.dtype == np.float32, type(layer).__name__
        assert all(p.grad.dtype == np.float32 for p in layer.parameters().values())
