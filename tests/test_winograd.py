"""Winograd F(2x2, 3x3) gives the im2col correlation and weight gradient, and conv.py uses it
only where it may."""

import numpy as np
import pytest

from tinyddpm.nn import conv, parallel
from tinyddpm.nn.winograd import CHUNK_PIXELS, correlate_3x3, correlate_3x3_weight_grad

SAME = ((1, 1), (1, 1))
SHAPES = [  # N, H, W, C, OC
    (1, 2, 2, 1, 1),  # a single tile
    (9, 16, 16, 5, 7),  # several chunks, C != OC
    (7, 8, 12, 6, 3),  # H != W
    (5, 32, 6, 3, 70),
    (10, 8, 8, 64, 96),  # the network's kind of widths
]


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def im2col_weight_grad(x, dout):
    """``dw`` by im2col, whatever conv.py would dispatch to."""
    cols = conv.im2col(conv.pad_hw(x, *SAME), 3, 3, 1)
    dw = cols.T @ dout.reshape(-1, dout.shape[3])
    return dw.reshape(3, 3, x.shape[3], dout.shape[3]).transpose(3, 2, 0, 1)


@pytest.mark.parametrize("N, H, W, C, OC", SHAPES)
def test_equals_im2col_in_float64(monkeypatch, N, H, W, C, OC):
    monkeypatch.setattr(parallel, "THREADS", 3)
    assert len(parallel.chunk_bounds(N, H * W, CHUNK_PIXELS)) > 1 or N == 1
    rng = np.random.default_rng(N * H + W)
    x = rng.standard_normal((N, H, W, C))
    w = rng.standard_normal((OC, C, 3, 3))
    dout = rng.standard_normal((N, H, W, OC))
    assert rel_err(correlate_3x3(x, w), conv.correlate_im2col(x, w, 1, SAME)) < 1e-13
    assert rel_err(correlate_3x3_weight_grad(x, dout), im2col_weight_grad(x, dout)) < 1e-13


def test_float32_is_about_as_accurate_as_im2col():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 16, 64))
    w = rng.standard_normal((64, 64, 3, 3))
    dout = rng.standard_normal((4, 16, 16, 64))
    x32, w32, dout32 = x.astype(np.float32), w.astype(np.float32), dout.astype(np.float32)

    exact = conv.correlate_im2col(x, w, 1, SAME)
    winograd = correlate_3x3(x32, w32)
    assert winograd.dtype == np.float32
    assert rel_err(winograd, exact) < 3 * rel_err(conv.correlate_im2col(x32, w32, 1, SAME), exact)

    exact = im2col_weight_grad(x, dout)
    winograd = correlate_3x3_weight_grad(x32, dout32)
    assert winograd.dtype == np.float32
    assert rel_err(winograd, exact) < 3 * rel_err(im2col_weight_grad(x32, dout32), exact)


def test_takes_a_strided_kernel_view():
    """The input gradient passes the flipped, transposed kernel as a view."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 6, 4, 5))
    w = rng.standard_normal((5, 7, 3, 3))[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    assert rel_err(correlate_3x3(x, w), conv.correlate_im2col(x, np.ascontiguousarray(w), 1, SAME)) < 1e-13


@pytest.fixture
def winograd_calls(monkeypatch):
    """Names of the Winograd functions conv.py calls (they still run)."""
    calls = []
    monkeypatch.setattr(conv, "correlate_3x3", lambda *a, **kw: calls.append("correlate") or correlate_3x3(*a, **kw))
    monkeypatch.setattr(conv, "correlate_3x3_weight_grad",
                        lambda *a: calls.append("weight_grad") or correlate_3x3_weight_grad(*a))
    return calls


def conv_results(x, w, b, dout):
    out, cache = conv.conv2d_forward(x, w, b)
    return [out, *conv.conv2d_backward(dout, cache)]


def test_conv2d_forward_and_backward_match_im2col(monkeypatch, winograd_calls):
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((5, 8, 8, 6)), rng.standard_normal((4, 6, 3, 3)), rng.standard_normal(4)
    dout = rng.standard_normal((5, 8, 8, 4))
    expected = conv_results(x, w, b, dout)
    assert not winograd_calls
    monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv, "WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS", 1)
    for got, want in zip(conv_results(x, w, b, dout), expected):
        assert rel_err(got, want) < 1e-13
    assert winograd_calls == ["correlate", "weight_grad", "correlate"]  # forward, dw, dx


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, expected", [
    ((2, 8, 6, 64), (64, 64, 3, 3), 1, None, True),
    ((2, 8, 6, 64), (64, 64, 3, 3), 1, SAME, True),
    ((2, 8, 6, 64), (8, 64, 3, 3), 1, SAME, True),  # 8 output channels
    ((2, 8, 6, 64), (7, 64, 3, 3), 1, SAME, False),  # 9 * 7 <= 64: conv.correlate_taps
    ((2, 8, 6, 63), (64, 63, 3, 3), 1, SAME, False),  # too few input channels
    ((2, 8, 6, 64), (64, 64, 3, 3), 2, None, False),
    ((2, 8, 6, 64), (64, 64, 1, 1), 1, None, False),
    ((2, 7, 6, 64), (64, 64, 3, 3), 1, None, False),  # odd H
    ((2, 8, 5, 64), (64, 64, 3, 3), 1, None, False),  # odd W
    ((2, 8, 6, 64), (64, 64, 3, 3), 1, ((0, 2), (1, 1)), False),
])
def test_correlate_dispatch(winograd_calls, x_shape, w_shape, stride, padding, expected):
    assert conv.WINOGRAD_MIN_CHANNELS == 64
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    out = conv.correlate(x, w, stride, padding)
    assert winograd_calls == (["correlate"] if expected else [])
    if expected:
        assert rel_err(out, conv.correlate_im2col(x, w, 1, SAME)) < 1e-13


@pytest.mark.parametrize("x_shape, dout_channels, kernel, stride, expected", [
    ((2, 8, 6, 64), 64, 3, 1, True),
    ((2, 8, 6, 63), 64, 3, 1, False),  # too few input channels
    ((2, 8, 6, 64), 63, 3, 1, False),  # too few output channels
    ((2, 8, 6, 64), 64, 3, 2, False),
    ((2, 8, 6, 64), 64, 1, 1, False),
    ((2, 7, 6, 64), 64, 3, 1, False),  # odd H
    ((2, 8, 5, 64), 64, 3, 1, False),  # odd W
])
def test_weight_grad_dispatch(winograd_calls, x_shape, dout_channels, kernel, stride, expected):
    assert conv.WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS == 64
    rng = np.random.default_rng(4)
    x = rng.standard_normal(x_shape)
    N, H, W, _ = x_shape
    dout = rng.standard_normal((N, -(-H // stride), -(-W // stride), dout_channels))
    dw = conv.correlate_weight_grad(x, dout, kernel, kernel, stride)
    assert winograd_calls == (["weight_grad"] if expected else [])
    if expected:
        assert rel_err(dw, im2col_weight_grad(x, dout)) < 1e-13


def test_never_on_the_gpu(xp):
    x = xp.zeros((2, 8, 8, 128), dtype=xp.float32)
    assert conv.winograd_fits(x, 3, 3, 1, SAME) == (xp is np)


@pytest.mark.parametrize("x_shape, w_shape, stride", [
    ((3, 8, 6, 64), (64, 64, 3, 3), 1),  # Winograd
    ((3, 8, 6, 5), (4, 5, 3, 3), 1),  # im2col
    ((3, 8, 6, 5), (4, 5, 3, 3), 2),  # im2col, stride 2
    ((3, 8, 6, 5), (4, 5, 1, 1), 1),  # 1x1: no patch matrix
    ((3, 8, 6, 20), (2, 20, 3, 3), 1),  # few outputs: per tap
])
def test_every_conv_road_adds_a_bias_per_sample_and_into_add_to(x_shape, w_shape, stride):
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    bias = rng.standard_normal((x_shape[0], w_shape[0]))
    plain = conv.correlate(x, w, stride)
    shifted = conv.correlate(x, w, stride, bias=bias)
    assert rel_err(shifted, plain + bias[:, None, None, :]) < 1e-13
    residual = rng.standard_normal(plain.shape)
    into = residual.copy()
    assert conv.correlate(x, w, stride, bias=bias[0], add_to=into) is into
    assert rel_err(into, residual + plain + bias[0]) < 1e-13
