"""Concatenation on the channel (last) axis: the U-Net's skip connections.

Shapes: ``a`` (..., Ca), ``b`` (..., Cb) -> out (..., Ca + Cb), ``[a, b]`` in that order.
"""

from tinyddpm.backend import get_array_module
from tinyddpm.nn.module import Module


class Concat(Module):
    """``[a, b]`` on the last axis; backward splits the gradient into ``(da, db)``."""

    def forward(self, a, b):
        self.save_for_backward(a.shape[-1])
        return get_array_module(a, b).concatenate((a, b), axis=-1)

    def backward(self, dout):
        (Ca,) = self.saved()
        xp = get_array_module(dout)
        return xp.ascontiguousarray(dout[..., :Ca]), xp.ascontiguousarray(dout[..., Ca:])
