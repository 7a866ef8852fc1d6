"""Add a per-sample channel vector to every pixel: how the time embedding enters a block.

Shapes: ``h`` (N, H, W, C), ``e`` (N, C) -> out (N, H, W, C) = ``h + e[:, None, None, :]``.
"""

from tinyddpm.nn.module import Module


class BroadcastAdd(Module):
    """``h + e`` broadcast over the pixels; backward gives ``(dh, de)``.

    ``dh`` is ``dout`` itself, not a copy: like every incoming gradient it is read-only.
    With ``inplace=True`` forward adds into ``h`` and returns it, sparing an
    activation-sized array; for an ``h`` that nothing else reads, such as a conv's output.
    """

    def __init__(self, inplace=False):
        self.inplace = inplace

    def forward(self, h, e):
        self.save_for_backward(h.shape)
        if self.inplace:
            h += e[:, None, None, :]
            return h
        return h + e[:, None, None, :]

    def backward(self, dout):
        (shape,) = self.saved()
        N, H, W, C = shape
        de = dout.reshape(N, H * W, C).sum(axis=1)
        return dout, de
