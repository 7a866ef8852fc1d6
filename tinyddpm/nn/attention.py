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
from tinyddpm.nn import fused, memory
from tinyddpm.nn.linear import Linear, linear_backward, linear_forward
from tinyddpm.nn.matmul import matmul
from tinyddpm.nn.module import Module, grad_enabled, prepared_weight
from tinyddpm.nn.parallel import map_chunks, scratch

SCORES_PER_CHUNK = 1 << 18  # a chunk's scores (or their gradients), 1 MB in float32, stay in cache


def softmax(scores):
    """Softmax over the last axis, in place on ``scores`` (which it returns); on CuPy, of
    contiguous ``scores``, one fused kernel (``fused.softmax_rows``)."""
    xp = get_array_module(scores)
    if xp is not np:
        return fused.softmax_rows(scores)
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


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
        N, L, C = q.shape
        if C % heads:
            raise ValueError(f"{C} channels do not split into {heads} heads")
        scale = 1.0 / math.sqrt(C // heads)
        kh, vh = _split_heads(k, heads), _split_heads(v, heads)
        xp = get_array_module(q)
        if xp is not np:  # CuPy: batched products over the (N, h) axes
            qh = _split_heads(q, heads) * scale
            p = softmax(matmul(qh, kh.transpose(0, 1, 3, 2)))
            self.save_for_backward(qh, kh, vh, p)
            return _merge_heads(matmul(p, vh))
        return self._forward_numpy(_split_heads(q, heads), kh, vh, scale)

    def _forward_numpy(self, qh, kh, vh, scale):
        """The whole forward chunk by chunk of the batch, so that each chunk's scores are
        built, normalised and used while they are in cache. Without grad, the scaled queries
        and the scores live in per-thread scratch arrays. The products are 2-D, one per
        sample and head: NumPy's stacked matmul does not hand transposed operands to BLAS."""
        N, heads, L, D = qh.shape
        dtype = np.result_type(qh, kh, vh)
        keep = grad_enabled()
        out = memory.empty((N, L, heads * D), dtype)
        out_h = _split_heads(out, heads)
        q_scaled = memory.empty(qh.shape, dtype) if keep else None
        p = memory.empty((N, heads, L, L), dtype) if keep else None

        def chunk(start, stop):
            n = stop - start
            q_c = q_scaled[start:stop] if keep else scratch("attention queries", (n, heads, L, D), dtype)
            p_c = p[start:stop] if keep else scratch("attention scores", (n, heads, L, L), dtype)
            np.multiply(qh[start:stop], scale, out=q_c)
            for i, h in np.ndindex(n, heads):
                np.matmul(q_c[i, h], kh[start + i, h].T, out=p_c[i, h])
            softmax(p_c)
            for i, h in np.ndindex(n, heads):
                np.matmul(p_c[i, h], vh[start + i, h], out=out_h[start + i, h])

        map_chunks(chunk, N, np, rows_per_item=heads * L * L, chunk_rows=SCORES_PER_CHUNK, min_rows=1)
        self.save_for_backward(q_scaled, kh, vh, p)
        return out

    def backward(self, dout):
        qh, kh, vh, p = self.saved()
        doh = _split_heads(dout, self.num_heads)
        scale = 1.0 / math.sqrt(qh.shape[-1])
        xp = get_array_module(dout)
        if xp is np:
            return self._backward_numpy(doh, qh, kh, vh, p, scale)
        dv = matmul(p.transpose(0, 1, 3, 2), doh)
        dscores = matmul(doh, vh.transpose(0, 1, 3, 2))
        dscores -= (dscores * p).sum(axis=-1, keepdims=True)
        dscores *= p
        dq = matmul(dscores, kh)
        dq *= scale
        dk = matmul(dscores.transpose(0, 1, 3, 2), qh)
        return _merge_heads(dq), _merge_heads(dk), _merge_heads(dv)

    @staticmethod
    def _backward_numpy(doh, qh, kh, vh, p, scale):
        """Backward chunk by chunk of the batch, each chunk's score gradients in a scratch array."""
        N, heads, L, D = qh.shape
        dtype = np.result_type(doh, qh)
        dq, dk, dv = (memory.empty((N, L, heads * D), dtype) for _ in range(3))
        dqh, dkh, dvh = (_split_heads(a, heads) for a in (dq, dk, dv))

        def chunk(start, stop):
            heads_of_chunk = [(start + i, h) for i, h in np.ndindex(stop - start, heads)]
            dscores = scratch("attention score gradients", (stop - start, heads, L, L), dtype)
            for (n, h), ds in zip(heads_of_chunk, dscores.reshape(-1, L, L)):
                np.matmul(p[n, h].T, doh[n, h], out=dvh[n, h])
                np.matmul(doh[n, h], vh[n, h].T, out=ds)
            p_c = p[start:stop]
            dscores -= (dscores * p_c).sum(axis=-1, keepdims=True)
            dscores *= p_c
            for (n, h), ds in zip(heads_of_chunk, dscores.reshape(-1, L, L)):
                np.matmul(ds, kh[n, h], out=dqh[n, h])
                dqh[n, h] *= scale
                np.matmul(ds.T, qh[n, h], out=dkh[n, h])

        map_chunks(chunk, N, np, rows_per_item=heads * L * L, chunk_rows=SCORES_PER_CHUNK, min_rows=1)
        return dq, dk, dv


class SelfAttention(Module):
    """Attention of a sequence on itself through learnt projections ``q``, ``k``, ``v``, ``o``.

    Shapes: s (N, L, C) -> out (N, L, C) = o(attention(q(s), k(s), v(s)));
    each projection is a Linear C -> C with bias.

    The layers ``q``, ``k`` and ``v`` hold the parameters, but their three products run
    as one, of ``s`` with their weights side by side (3C, C): one pass over ``s`` and a
    product three times as wide, which BLAS runs faster. ``q``, ``k`` and ``v`` are then
    column slices of that product's output.
    """

    def __init__(self, channels, num_heads=1, rng=None, dtype=np.float32):
        rng = np.random.default_rng() if rng is None else rng
        self.q = Linear(channels, channels, rng=rng, dtype=dtype)
        self.k = Linear(channels, channels, rng=rng, dtype=dtype)
        self.v = Linear(channels, channels, rng=rng, dtype=dtype)
        self.o = Linear(channels, channels, rng=rng, dtype=dtype)
        self.attention = ScaledDotProductAttention(num_heads)

    def _qkv_weight_and_bias(self):
        projections = (self.q, self.k, self.v)
        xp = get_array_module(self.q.weight.data)
        return prepared_weight(self.q.weight.data, "qkv", lambda _: (
            xp.concatenate([p.weight.data for p in projections]),
            xp.concatenate([p.bias.data for p in projections])))

    def forward(self, s):
        C = s.shape[-1]
        qkv, cache = linear_forward(s, *self._qkv_weight_and_bias())
        self.save_for_backward(cache)
        return self.o(self.attention(qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]))

    def backward(self, dout):
        (cache,) = self.saved()
        dq, dk, dv = self.attention.backward(self.o.backward(dout))
        C = dq.shape[-1]
        dqkv = memory.empty((*dq.shape[:-1], 3 * C), dq.dtype, get_array_module(dq))
        for i, d in enumerate((dq, dk, dv)):
            dqkv[..., i * C:(i + 1) * C] = d
        ds, dw, db = linear_backward(dqkv, cache)
        for i, projection in enumerate((self.q, self.k, self.v)):
            projection.weight.grad += dw[i * C:(i + 1) * C]
            projection.bias.grad += db[i * C:(i + 1) * C]
        return ds
