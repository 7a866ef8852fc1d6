"""Swish (SiLU), the network's only activation: ``swish(x) = x * sigmoid(x)``.

Shapes: any; the output has the shape of the input.

The sigmoid is computed as ``0.5 * tanh(x / 2) + 0.5``, which equals
``1 / (1 + exp(-x))`` but cannot overflow for large negative ``x``.
With ``s = sigmoid(x)`` the derivative is ``s * (1 + x * (1 - s))``.
Both directions run in place, chunk by chunk on all cores (see ``parallel.py``).
"""

from tinyddpm.backend import get_array_module
from tinyddpm.nn.module import Module
from tinyddpm.nn.parallel import map_elementwise


def sigmoid(x, out=None):
    """Logistic sigmoid without overflow, into ``out`` if given."""
    xp = get_array_module(x)
    s = xp.multiply(x, 0.5, out=out)
    xp.tanh(s, out=s)
    s *= 0.5
    s += 0.5
    return s


class Swish(Module):
    """``x * sigmoid(x)`` element-wise. Shapes: x (any) -> out (same)."""

    def forward(self, x):
        xp = get_array_module(x)
        s, out = xp.empty_like(x, order="C"), xp.empty_like(x, order="C")

        def chunk(x, s, out):
            sigmoid(x, out=s)
            xp.multiply(x, s, out=out)

        map_elementwise(chunk, x, s, out)
        self.save_for_backward(x, s)
        return out

    def backward(self, dout):
        x, s = self.saved()
        xp = get_array_module(x)
        grad = xp.empty_like(s)

        def chunk(x, s, dout, grad):
            xp.subtract(1.0, s, out=grad)
            grad *= x
            grad += 1.0
            grad *= s
            grad *= dout

        map_elementwise(chunk, x, s, dout, grad)
        return grad
