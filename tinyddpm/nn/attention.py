"""Scaled dot-product attention and the single-block self-attention built on it.

Shapes: queries, keys and values ``q, k, v`` (N, L, C): N sequences of L
positions (an image's H*W pixels) with C channels. With h heads the channels
split into h chunks of D = C / h; each head attends on its own chunk, and the
heads are computed together as a (N, h, L, D) batch of matrix products.

    scores = (q / sqrt(D)) @ k^T        (N, h, L, L), one row per query
    p      = softmax(scores) over the L keys (stabilised by subtracting the row max)
    out    = p @ v                      (N, h, L, D), heads merged back to (N, L, C)

Backward, with ``dout`` split the same way:
``dv = p^T @ dout``, ``dp = dout @ v^T``, ``dscores = p * (dp - rowsum(dp * p))``,
``dq = dscores @ k / sqrt(D)``, ``dk = dscores^T @ (q / sqrt(D))``.
"""

import math

import numpy as np

from tinyddpm.backend import get_array_module
from tinyddpm.nn.linear import Linear
from tinyddpm.nn.module import Module
from tinyddpm.nn.parallel import map_chunks


def softmax(scores):
    """Softmax over the last axis, in place on ``scores`` (which it returns)."""
    xp = get_array_module(scores)
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def batched_matmul(a, b):
    """``a @ b`` over the leading (batch, head) axes.

    NumPy's stacked matmul does not hand transposed operands to BLAS and falls
    back to a slow loop; one 2-D product per matrix pair does use BLAS (which
    reads transposed views as they are), and is 10-40x faster here; chunks of
    the batch share these products out over the cores. CuPy's batched matmul is
    fine as it is.
    """
    xp = get_array_module(a)
    if xp is not np:
        return xp.matmul(a, b)
    out = np.empty(a.shape[:-1] + b.shape[-1:], dtype=np.result_type(a, b))

    def chunk(start, stop):
        for index in np.ndindex(stop - start, *a.shape[1:-2]):
            index = (start + index[0], *index[1:])
            np.matmul(a[index], b[index], out=out[index])

    map_chunks(chunk, a.shape[0], np, rows_per_item=a.shape[-2])
    return out


def _split_heads(a, heads):
    """(N, L, C) -> (N, h, L, D), a view."""
    N, L, C = a.shape
    return a.reshape(N, L, heads, C // heads).transpose(0, 2, 1, 3)


def _merge_heads(a):
    """(N, h, L, D) -> (N, L, C)."""
    N, heads, L, D = a.shape
    return a.transpose(0, 2, 1, 3).reshape(N, L, heads * D)


class ScaledDotProductAttention(Module):
    """Multi-head softmax attention without parameters.

    Shapes: q, k, v (N, L, C) -> out (N, L, C); C must divide into ``num_heads``.
    """

    def __init__(self, num_heads=1):
        self.num_heads = num_heads

    def forward(self, q, k, v):
        heads = self.num_heads
        if q.shape[-1] % heads:
            raise ValueError(f"{q.shape[-1]} channels do not split into {heads} heads")
        qh = _split_heads(q, heads) * (1.0 / math.sqrt(q.shape[-1] // heads))
        kh = _split_heads(k, heads)
        vh = _split_heads(v, heads)
        p = softmax(batched_matmul(qh, kh.transpose(0, 1, 3, 2)))
        self.save_for_backward(qh, kh, vh, p)
        return _merge_heads(batched_matmul(p, vh))

    def backward(self, dout):
        qh, kh, vh, p = self.saved()
        doh = _split_heads(dout, self.num_heads)
        dv = batched_matmul(p.transpose(0, 1, 3, 2), doh)
        dscores = batched_matmul(doh, vh.transpose(0, 1, 3, 2))
        dscores -= (dscores * p).sum(axis=-1, keepdims=True)
        dscores *= p
        dq = batched_matmul(dscores, kh)
        dq *= 1.0 / math.sqrt(qh.shape[-1])
        dk = batched_matmul(dscores.transpose(0, 1, 3, 2), qh)
        return _merge_heads(dq), _merge_heads(dk), _merge_heads(dv)


class SelfAttention(Module):
    """Attention of a sequence on itself through learnt projections ``q``, ``k``, ``v``, ``o``.

    Shapes: s (N, L, C) -> out (N, L, C) = o(attention(q(s), k(s), v(s)));
    each projection is a Linear C -> C with bias.
    """

    def __init__(self, channels, num_heads=1, rng=None, dtype=np.float32):
        rng = np.random.default_rng() if rng is None else rng
        self.q = Linear(channels, channels, rng=rng, dtype=dtype)
        self.k = Linear(channels, channels, rng=rng, dtype=dtype)
        self.v = Linear(channels, channels, rng=rng, dtype=dtype)
        self.o = Linear(channels, channels, rng=rng, dtype=dtype)
        self.attention = ScaledDotProductAttention(num_heads)

    def forward(self, s):
        return self.o(self.attention(self.q(s), self.k(s), self.v(s)))

    def backward(self, dout):
        dq, dk, dv = self.attention.backward(self.o.backward(dout))
        ds = self.q.backward(dq)
        ds += self.k.backward(dk)
        ds += self.v.backward(dv)
        return ds
