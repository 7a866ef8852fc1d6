"""Add a per-sample channel vector to every pixel: how the time embedding enters a block.

Shapes: ``h`` (N, H, W, C), ``e`` (N, C) -> out (N, H, W, C) = ``h + e[:, None, None, :]``.
"""

from tinyddpm.nn.module import Module


class BroadcastAdd(Module):
    """``h + e`` broadcast over the pixels; backward gives ``(dh, de)``.

    ``dh`` is ``dout`` itself, not a copy: like every incoming gradient it is read-only.
    """

    def forward(self, h, e):
        self.save_for_backward(h.shape)
        return h + e[:, None, None, :]

    def backward(self, dout):
        (shape,) = self.saved()
        N, H, W, C = shape
        de = dout.reshape(N, H * W, C).sum(axis=1)
        return dout, de
