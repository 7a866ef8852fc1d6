"""Swish (SiLU), the network's only activation: ``swish(x) = x * sigmoid(x)``.

Shapes: any; the output has the shape of the input.

The sigmoid is computed as ``0.5 * tanh(x / 2) + 0.5``, which equals
``1 / (1 + exp(-x))`` but cannot overflow for large negative ``x``.
With ``s = sigmoid(x)`` the derivative is ``s * (1 + x * (1 - s))``.
"""

from tinyddpm.backend import get_array_module
from tinyddpm.nn.module import Module


def sigmoid(x):
    """Logistic sigmoid without overflow."""
    s = x * 0.5
    get_array_module(x).tanh(s, out=s)
    s *= 0.5
    s += 0.5
    return s


class Swish(Module):
    """``x * sigmoid(x)`` element-wise. Shapes: x (any) -> out (same)."""

    def forward(self, x):
        s = sigmoid(x)
        self.save_for_backward(x, s)
        return x * s

    def backward(self, dout):
        x, s = self.saved()
        grad = 1.0 - s
        grad *= x
        grad += 1.0
        grad *= s
        grad *= dout
        return grad
