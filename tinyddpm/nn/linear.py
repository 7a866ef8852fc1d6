"""Fully connected layer ``y = x @ W.T + b`` over the last axis.

Shapes: input ``x`` (..., in) with any leading dims, weight ``W`` (out, in)
(the PyTorch layout), bias ``b`` (out,), output (..., out).
"""

import numpy as np

from tinyddpm.backend import get_array_module
from tinyddpm.nn import memory
from tinyddpm.nn.conv import bias_grad, glorot_uniform
from tinyddpm.nn.matmul import matmul
from tinyddpm.nn.module import Module, Parameter
from tinyddpm.nn.parallel import map_chunks


def linear_forward(x, w, b):
    """``x`` (..., in) -> ``(x @ w.T + b, cache)``, as one matrix product over all rows.

    Long inputs (the pixels of an attention block) are split into chunks of rows on all cores.
    """
    xp = get_array_module(x)
    out_features, in_features = w.shape
    x2d = x.reshape(-1, in_features)
    out = memory.empty((x2d.shape[0], out_features), xp.result_type(x, w), xp)

    def chunk(start, stop):
        matmul(x2d[start:stop], w.T, out=out[start:stop])
        out[start:stop] += b

    map_chunks(chunk, x2d.shape[0], xp)
    return out.reshape(*x.shape[:-1], out_features), (x, w)


def linear_backward(dout, cache):
    """Gradients ``(dx, dw, db)`` of :func:`linear_forward`; ``dw`` is summed over chunks of rows."""
    x, w = cache
    xp = get_array_module(x)
    out_features, in_features = w.shape
    dout2d, x2d = dout.reshape(-1, out_features), x.reshape(-1, in_features)
    dx = memory.empty(x2d.shape, xp.result_type(dout, w), xp)

    def chunk(start, stop):
        matmul(dout2d[start:stop], w, out=dx[start:stop])
        return matmul(dout2d[start:stop].T, x2d[start:stop])

    dw = sum(map_chunks(chunk, x2d.shape[0], xp))
    db = bias_grad(dout2d)
    return dx.reshape(x.shape), dw, db


class Linear(Module):
    """``y = x @ weight.T + bias``. Shapes: x (..., in) -> out (..., out); weight (out, in), bias (out,)."""

    def __init__(self, in_features, out_features, rng=None, dtype=np.float32):
        rng = np.random.default_rng() if rng is None else rng
        self.weight = Parameter(glorot_uniform(
            rng, (out_features, in_features), fan_in=in_features, fan_out=out_features, dtype=dtype))
        self.bias = Parameter(np.zeros(out_features, dtype=dtype))

    def forward(self, x):
        out, cache = linear_forward(x, self.weight.data, self.bias.data)
        self.save_for_backward(cache)
        return out

    def backward(self, dout):
        (cache,) = self.saved()
        dx, dw, db = linear_backward(dout, cache)
        self.weight.grad += dw
        self.bias.grad += db
        return dx
