"""Concatenation on the channel (last) axis: the U-Net's skip connections.

Shapes: ``a`` (..., Ca), ``b`` (..., Cb) -> out (..., Ca + Cb), ``[a, b]`` in that order.

On NumPy both directions copy chunk by chunk of the leading axis on all cores: a copy
runs on one core in NumPy, and the pages of a fresh output fault in where it is written.
"""

import numpy as np

from tinyddpm.backend import get_array_module
from tinyddpm.nn import memory
from tinyddpm.nn.module import Module
from tinyddpm.nn.parallel import map_chunks

CHUNK_NUMBERS = 1 << 18  # numbers copied per chunk at most, and a quarter of that at least


def _map_samples(fn, a):
    """:func:`map_chunks` of ``fn`` over chunks of the samples (leading axis) of ``a``."""
    return map_chunks(fn, len(a), np, rows_per_item=a[0].size, chunk_rows=CHUNK_NUMBERS,
                      min_rows=CHUNK_NUMBERS // 4)


class Concat(Module):
    """``[a, b]`` on the last axis; backward splits the gradient into ``(da, db)``."""

    def forward(self, a, b):
        self.save_for_backward(a.shape[-1])
        xp = get_array_module(a, b)
        if xp is not np:
            return xp.concatenate((a, b), axis=-1)
        Ca = a.shape[-1]
        out = memory.empty((*a.shape[:-1], Ca + b.shape[-1]), np.result_type(a, b))

        def chunk(start, stop):
            out[start:stop, ..., :Ca] = a[start:stop]
            out[start:stop, ..., Ca:] = b[start:stop]

        _map_samples(chunk, out)
        return out

    def backward(self, dout):
        (Ca,) = self.saved()
        xp = get_array_module(dout)
        if xp is not np:
            return xp.ascontiguousarray(dout[..., :Ca]), xp.ascontiguousarray(dout[..., Ca:])
        da, db = memory.empty_like(dout[..., :Ca]), memory.empty_like(dout[..., Ca:])

        def chunk(start, stop):
            da[start:stop] = dout[start:stop, ..., :Ca]
            db[start:stop] = dout[start:stop, ..., Ca:]

        _map_samples(chunk, dout)
        return da, db
