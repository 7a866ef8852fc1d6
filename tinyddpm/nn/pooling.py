"""Global average pooling: each channel's mean over the image.

Shapes: x (N, H, W, C) -> out (N, C). Backward spreads each channel's gradient
evenly over its H*W pixels.
"""

from tinyddpm.backend import get_array_module
from tinyddpm.nn.module import Module


class GlobalAvgPool(Module):
    """``x.mean over H, W``. Shapes: x (N, H, W, C) -> (N, C)."""

    def forward(self, x):
        self.save_for_backward(x.shape)
        return x.mean(axis=(1, 2))

    def backward(self, dout):
        (shape,) = self.saved()
        N, H, W, C = shape
        xp = get_array_module(dout)
        return xp.broadcast_to((dout / (H * W))[:, None, None, :], shape).copy()
