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
The output is computed as ``x / (1 + exp(-x))``: a division in place of the
sigmoid's reciprocal and a product, one pass fewer. Training then turns the kept
denominator into the sigmoid; without grad (sampling) nothing is kept, and each
chunk's denominator lives in a small scratch buffer. Both directions run chunk by
chunk on all cores (see ``parallel.py``), or as one fused kernel each on the GPU
(``fused.py``).
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
    """``out = x * sigmoid(x)``, as ``x / (1 + exp(-x))`` with ``s`` for the denominator
    (NumPy; ``out`` may be ``x``). Four passes: one fewer than the sigmoid and a product."""
    with np.errstate(over="ignore"):
        np.negative(x, out=s)
        np.exp(s, out=s)
    s += 1.0
    np.divide(x, s, out=out)


def swish_of_negated_into(negated, out, s):
    """``out = swish(x)`` from ``negated = -x``, as ``-x / (-1 - exp(-x))`` with ``s`` for the
    denominator (NumPy; ``out`` may be ``negated``): three passes, for a caller that can make
    ``-x`` as cheaply as ``x``. Negation is exact, so this equals :func:`swish_into` bit for bit."""
    with np.errstate(over="ignore"):
        np.exp(negated, out=s)
    np.subtract(-1.0, s, out=s)
    np.divide(negated, s, out=out)


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
            if s is None:
                swish_into(x, out, scratch("swish denominator", x.shape, x.dtype))
            else:
                swish_into(x, out, s)
                np.reciprocal(s, out=s)  # the denominator 1 + exp(-x) becomes the sigmoid

        map_elementwise(chunk, x, out, *(() if s is None else (s,)))
        self.save_for_backward(s, out)
        return out

    def backward(self, dout):
        return swish_backward(*self.saved(), dout)
