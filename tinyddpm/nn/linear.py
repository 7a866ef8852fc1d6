"""Fully connected layer ``y = x @ W.T + b`` over the last axis.

Shapes: input ``x`` (..., in) with any leading dims, weight ``W`` (out, in)
(the PyTorch layout), bias ``b`` (out,), output (..., out).
"""

import numpy as np

from tinyddpm.nn.conv import glorot_uniform
from tinyddpm.nn.module import Module, Parameter


def linear_forward(x, w, b):
    """``x`` (..., in) -> ``(x @ w.T + b, cache)``, as one matrix product over all rows."""
    out_features, in_features = w.shape
    out = x.reshape(-1, in_features) @ w.T
    out += b
    return out.reshape(*x.shape[:-1], out_features), (x, w)


def linear_backward(dout, cache):
    """Gradients ``(dx, dw, db)`` of :func:`linear_forward`."""
    x, w = cache
    out_features, in_features = w.shape
    dout2d = dout.reshape(-1, out_features)
    dw = dout2d.T @ x.reshape(-1, in_features)
    db = dout2d.sum(axis=0)
    dx = (dout2d @ w).reshape(x.shape)
    return dx, dw, db


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
