"""Swish (SiLU), the network's only activation: ``swish(x) = x * sigmoid(x)``.

Shapes: any; the output has the shape of the input.

The sigmoid is ``1 / (1 + exp(-x))``. For very negative ``x`` (below -88 in
float32) ``exp(-x)`` overflows to inf and the sigmoid comes out as exactly 0,
its correct rounded value, so that overflow is expected and not reported.
(NumPy's float32 ``exp`` is 2x faster than its ``tanh`` on AVX2, which made the
equivalent ``0.5 tanh(x / 2) + 0.5`` the slower choice here.)
With ``s = sigmoid(x)`` the derivative is ``s * (1 + x * (1 - s))``, which is
``s + out * (1 - s)``: backward needs ``s`` and the output only. The output is
also what the next layer keeps for its own backward, so saving it costs no
memory, and the input can be freed (one activation fewer per Swish).
Without grad (sampling) no sigmoid is kept: each chunk's lives in a small scratch
buffer. Both directions run chunk by chunk on all cores (see ``parallel.py``),
or as one fused kernel each on the GPU (``fused.py``).
"""

import numpy as np

from tinyddpm.backend import get_array_module
from tinyddpm.nn import fused, memory
from tinyddpm.nn.module import Module, grad_enabled
from tinyddpm.nn.parallel import map_elementwise, scratch


def sigmoid(x, out=None):
    """Logistic sigmoid, into ``out`` if given."""
    xp = get_array_module(x)
    with np.errstate(over="ignore"):
        s = xp.negative(x, out=out)
        xp.exp(s, out=s)
    s += 1.0
    xp.reciprocal(s, out=s)
    return s


def swish_into(x, out, s):
    """``out = x * sigmoid(x)`` with the sigmoid in ``s`` (NumPy; ``out`` may be ``x``)."""
    np.multiply(x, sigmoid(x, out=s), out=out)


def swish_backward(s, out, dout):
    """The gradient of ``out = swish(x)`` from its sigmoid ``s`` and output: ``dout * (s + out * (1 - s))``."""
    xp = get_array_module(s)
    if xp is not np:
        return fused.swish_backward(s, out, dout)
    grad = memory.empty_like(s)

    def chunk(s, out, dout, grad):
        xp.subtract(1.0, s, out=grad)
        grad *= out
        grad += s
        grad *= dout

    map_elementwise(chunk, s, out, dout, grad)
    return grad


class Swish(Module):
    """``x * sigmoid(x)`` element-wise. Shapes: x (any) -> out (same).

    With ``inplace=True`` the output is written over ``x`` (on NumPy, when ``x`` is
    contiguous), for an ``x`` that nothing else reads, such as a GroupNorm's output.
    """

    def __init__(self, inplace=False):
        self.inplace = inplace

    def forward(self, x):
        xp = get_array_module(x)
        if xp is not np:
            s, out = fused.swish_forward(x)
            self.save_for_backward(s, out)
            return out
        out = x if self.inplace and x.flags.c_contiguous else memory.empty_like(x)
        # Backward needs the sigmoid; without grad each chunk's lives in a small scratch buffer.
        s = memory.empty_like(x) if grad_enabled() else None

        def chunk(x, out, s=None):
            swish_into(x, out, scratch("swish sigmoid", x.shape, x.dtype) if s is None else s)

        map_elementwise(chunk, x, out, *(() if s is None else (s,)))
        self.save_for_backward(s, out)
        return out

    def backward(self, dout):
        return swish_backward(*self.saved(), dout)
