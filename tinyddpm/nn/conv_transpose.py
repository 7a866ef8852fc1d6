"""3x3 stride-2 transposed convolution: the up-sampling layer, adjoint of the down conv.

Shapes: input ``x`` (N, H, W, C_in), weight ``w`` (C_in, C_out, KH, KW) (the
PyTorch layout), bias ``b`` (C_out,), output (N, 2H, 2W, C_out).

Every input pixel scatters a weighted 3x3 stamp into the output,
``y[2i + a, 2j + b, o] += x[i, j, c] * w[c, o, a, b]``, which fills a
(2H+1) x (2W+1) grid; the layer keeps the first 2H rows and 2W columns. That is
exactly the input gradient of the 3x3 stride-2 "same" conv (pad 0 top/left, 1
bottom/right) on a 2H x 2W image, with ``w`` read as that conv's (OC, C, KH, KW)
weight. So backward reuses the conv's forward (im2col and one product) for ``dx``
and its weight gradient for ``dw``, and on the GPU forward reuses the conv's
input-gradient code (one product and a col2im).

On the CPU forward works by output phase instead. The output pixels
``(2r + p, 2s + q)`` of one parity ``(p, q)`` take taps of one parity each:

    phase (1, 1): x[r, s] w[1, 1]
    phase (1, 0): x[r, s] w[1, 0] + x[r, s - 1] w[1, 2]
    phase (0, 1): x[r, s] w[0, 1] + x[r - 1, s] w[2, 1]
    phase (0, 0): x[r, s] w[0, 0] + x[r, s - 1] w[0, 2] + x[r - 1, s] w[2, 0] + x[r - 1, s - 1] w[2, 2]

(``w[a, b]`` the (C_in, C_out) matrix ``w[:, :, a, b]``, terms outside ``x`` left out).
One product makes every ``x[r, s] w[a, b]``, and each phase is written straight into
the output with the bias, then its shifted taps are added: a col2im would also zero a
padded image, add all nine taps into it, crop it and add the bias, three more passes.
"""

import numpy as np

from tinyddpm.backend import get_array_module
from tinyddpm.nn import memory
from tinyddpm.nn.conv import (
    bias_grad,
    correlate,
    correlate_input_grad,
    correlate_weight_grad,
    glorot_uniform,
)
from tinyddpm.nn.matmul import matmul
from tinyddpm.nn.module import Module, Parameter, prepared_weight
from tinyddpm.nn.parallel import CHUNK_ROWS, map_chunks, scratch

STRIDE = 2
KERNEL = 3


def conv_transpose2d_forward(x, w, b):
    """Up-sample ``x`` (N, H, W, C_in) with ``w`` (C_in, C_out, 3, 3) and bias ``b``.

    Returns ``(out, cache)`` with ``out`` (N, 2H, 2W, C_out).
    """
    N, H, W, _ = x.shape
    out_shape = (N, STRIDE * H, STRIDE * W, w.shape[1])
    if get_array_module(x) is not np:
        out = correlate_input_grad(x, w, out_shape, STRIDE)
        out += b
        return out, (x, w)
    out = memory.empty(out_shape, np.result_type(x, w))
    map_chunks(lambda start, stop: _phases_forward(x[start:stop], w, b, out[start:stop]), N, np,
               rows_per_item=H * W, chunk_rows=CHUNK_ROWS // 4)  # the taps are 9 C_out wide
    return out, (x, w)


def _phases_forward(x, w, b, out):
    """Forward on NumPy, phase by phase (see the module docstring): ``x`` (n, H, W, C_in) into ``out``."""
    n, H, W, C_in = x.shape
    C_out = w.shape[1]
    tap_matrix = prepared_weight(w, "taps side by side", lambda w: np.ascontiguousarray(
        w.transpose(0, 2, 3, 1).reshape(C_in, KERNEL * KERNEL * C_out)))
    taps = scratch("transposed conv taps", (n * H * W, KERNEL * KERNEL * C_out), out.dtype)
    matmul(x.reshape(-1, C_in), tap_matrix, out=taps)
    taps = taps.reshape(n, H, W, KERNEL, KERNEL, C_out)  # taps[:, r, s, a, b] = x[r, s] w[a, b]
    phases = out.reshape(n, H, STRIDE, W, STRIDE, C_out)  # phases[:, r, p, s, q] = out[:, 2r + p, 2s + q]
    # The two column phases of a row phase are written together: taps (a, 0) and (a, 1) lie
    # side by side, as do the phases, and NumPy runs along 2 C_out numbers faster than along C_out.
    bias_pair = np.stack((b, b))
    for p in range(STRIDE):
        row_phase = phases[:, :, p]  # out[:, p::2], as (n, H, W, 2, C_out)
        np.add(taps[:, :, :, p, :2], bias_pair, out=row_phase)
        row_phase[:, :, 1:, 0] += taps[:, :, :-1, p, 2]
        if p == 0:
            row_phase[:, 1:] += taps[:, :-1, :, 2, :2]
            row_phase[:, 1:, 1:, 0] += taps[:, :-1, :-1, 2, 2]


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
