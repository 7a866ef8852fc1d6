"""3x3 stride-2 transposed convolution: the up-sampling layer, adjoint of the down conv.

Shapes: input ``x`` (N, H, W, C_in), weight ``w`` (C_in, C_out, KH, KW) (the
PyTorch layout), bias ``b`` (C_out,), output (N, 2H, 2W, C_out).

Every input pixel scatters a weighted 3x3 stamp into the output,
``y[2i + a, 2j + b, o] += x[i, j, c] * w[c, o, a, b]``, which fills a
(2H+1) x (2W+1) grid; the layer keeps the first 2H rows and 2W columns. That is
exactly the input gradient of the 3x3 stride-2 "same" conv (pad 0 top/left, 1
bottom/right) on a 2H x 2W image, with ``w`` read as that conv's (OC, C, KH, KW)
weight. So forward reuses the conv's input-gradient code (one product and a
col2im), and backward reuses its forward (im2col and one product) for ``dx``
and its weight gradient for ``dw``.
"""

import numpy as np

from tinyddpm.nn.conv import (
    bias_grad,
    correlate,
    correlate_input_grad,
    correlate_weight_grad,
    glorot_uniform,
)
from tinyddpm.nn.module import Module, Parameter

STRIDE = 2
KERNEL = 3


def conv_transpose2d_forward(x, w, b):
    """Up-sample ``x`` (N, H, W, C_in) with ``w`` (C_in, C_out, 3, 3) and bias ``b``.

    Returns ``(out, cache)`` with ``out`` (N, 2H, 2W, C_out).
    """
    N, H, W, _ = x.shape
    out = correlate_input_grad(x, w, (N, STRIDE * H, STRIDE * W, w.shape[1]), STRIDE)
    out += b
    return out, (x, w)


def conv_transpose2d_backward(dout, cache):
    """Gradients ``(dx, dw, db)`` of :func:`conv_transpose2d_forward`."""
    x, w = cache
    db = bias_grad(dout)
    dx = correlate(dout, w, STRIDE)
    dw = correlate_weight_grad(dout, x, KERNEL, KERNEL, STRIDE)
    return dx, dw, db


class ConvTranspose2d(Module):
    """3x3 stride-2 transposed conv that doubles H and W (cropping bottom/right).

    Shapes: x (N, H, W, C_in) -> out (N, 2H, 2W, C_out);
    weight (C_in, C_out, 3, 3), bias (C_out,).
    """

    def __init__(self, in_channels, out_channels, rng=None, dtype=np.float32):
        rng = np.random.default_rng() if rng is None else rng
        area = KERNEL * KERNEL
        self.weight = Parameter(glorot_uniform(
            rng, (in_channels, out_channels, KERNEL, KERNEL),
            fan_in=in_channels * area, fan_out=out_channels * area, dtype=dtype))
        self.bias = Parameter(np.zeros(out_channels, dtype=dtype))

    def forward(self, x):
        out, cache = conv_transpose2d_forward(x, self.weight.data, self.bias.data)
        self.save_for_backward(cache)
        return out

    def backward(self, dout):
        (cache,) = self.saved()
        dx, dw, db = conv_transpose2d_backward(dout, cache)
        self.weight.grad += dw
        self.bias.grad += db
        return dx
