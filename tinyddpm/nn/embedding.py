"""Sinusoidal encoding of the diffusion step, the input of the time MLP.

Shapes: ``t`` (N,) integer steps (1-based, fed as is) -> (N, dim), with
``e[:, 2i] = sin(t / 10000^(2i/dim))`` and ``e[:, 2i+1] = cos(t / 10000^(2i/dim))``
for i = 0 .. dim/2 - 1 (sines and cosines interleaved). Computed in float64 and
cast to the layer's dtype.
"""

import numpy as np

from tinyddpm.backend import get_array_module
from tinyddpm.nn.module import Module


class SinusoidalEmbedding(Module):
    """Transformer-style sinusoids of the step ``t``; no parameters, no gradient.

    Shapes: t (N,) -> out (N, dim).
    """

    def __init__(self, dim=64, dtype=np.float32):
        if dim % 2:
            raise ValueError(f"the embedding dimension must be even, got {dim}")
        self.dim = dim
        self.dtype = dtype

    def forward(self, t):
        xp = get_array_module(t)
        exponents = xp.arange(0, self.dim, 2, dtype=np.float64) / self.dim  # 2i / dim
        angles = xp.asarray(t, dtype=np.float64)[:, None] / 10000.0 ** exponents
        out = xp.empty((angles.shape[0], self.dim), dtype=np.float64)
        out[:, 0::2] = xp.sin(angles)
        out[:, 1::2] = xp.cos(angles)
        return out.astype(self.dtype)

    def backward(self, dout):
        return None
