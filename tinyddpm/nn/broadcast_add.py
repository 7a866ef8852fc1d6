"""Add a per-sample channel vector to every pixel: how the time embedding enters a block.

Shapes: ``h`` (N, H, W, C), ``e`` (N, C) -> out (N, H, W, C) = ``h + e[:, None, None, :]``.
"""

from tinyddpm.nn.conv import pixel_sums
from tinyddpm.nn.module import Module


class BroadcastAdd(Module):
    """``h + e`` broadcast over the pixels; backward gives ``(dh, de)``.

    ``dh`` is ``dout`` itself, not a copy: like every incoming gradient it is read-only.
    """

    def forward(self, h, e):
        self.save_for_backward()
        return h + e[:, None, None, :]

    def backward(self, dout):
        self.saved()
        return dout, pixel_sums(dout)
