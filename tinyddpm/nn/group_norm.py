"""Group normalisation over channels-last images and over plain feature vectors.

Shapes: input ``x`` (N, H, W, C) or (N, C), weight ``gamma`` and bias ``beta``
(C,), output the shape of ``x``. The C channels are split into G groups of
C / G consecutive channels; each sample's group is normalised by its own mean
and biased variance over its M = L * C / G values (L = H*W pixels, or 1 for a
vector).

Internally ``x`` is viewed as (N, L, C). Every statistic is first summed per
sample and channel over the pixels, (N, C), then per group, and spread back
over the group's channels as (N, 1, C) so it broadcasts along whole pixel rows
(broadcasting along runs of C values is several times faster in NumPy than
along (N, L, G, C/G) with a size-1 last axis). Forward goes one step further and
spreads its statistics over rows of several pixels (``ROW_NUMBERS``).

Backward uses the closed form in the normalised input ``xhat`` and the inverse
standard deviation ``inv_std``, with group means over the M values:
``dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))``, ``dxhat = dout * gamma``.
On the CPU, forward keeps the input with the per-group mean and ``inv_std`` rather
than ``xhat``, and backward recomputes ``xhat`` chunk by chunk, in cache: the
input is usually kept anyway (a residual or skip connection holds it), so this
saves an activation-sized array per layer, and its allocation.

On the GPU the same sums and products run as a few fused kernels (``fused.py``); without
grad, one kernel after the statistics writes only the output that the next layers read.
"""

import functools

import numpy as np

from tinyddpm.backend import get_array_module
from tinyddpm.nn import fused, memory
from tinyddpm.nn.activation import sigmoid, swish_backward, swish_into, swish_of_negated_into
from tinyddpm.nn.conv import pixel_sums
from tinyddpm.nn.module import Module, Parameter, grad_enabled
from tinyddpm.nn.parallel import map_chunks, scratch

# A chunk of the batch holds 2^18 to 2^19 numbers (1-2 MB in float32), in cache (L3) across
# the passes over it. Smaller chunks were slower, as were smaller blocks inside a chunk
# (measured down to 2^14 numbers): their extra NumPy calls cost more than L2 hits save. Chunks
# of up to 2^20 numbers were slower too, where a batch fills them: against 2^20, 2^19 took a
# 64-image sampling slice 0.935 of the time, a training step at batch 128 0.976 and an 8-image
# slice 0.988 (paired medians of interleaved passes: 12, 5 and 40 rounds).
CHUNK_NUMBERS = 1 << 19
MIN_CHUNK_NUMBERS = 1 << 18
# NumPy applies an (n, 1, C) statistic to (n, L, C) pixels up to 2x slower than it adds two
# arrays of that shape when C is 64-256, and only about 1.35x slower when a row holds 512
# numbers (several pixels, the statistic repeated to match). Rows of 1024 or 2048 numbers
# were as fast in most runs but up to 8x slower in some, depending on where the arrays lay
# (4 KB aliasing of loads and stores, presumably): rows stay at 512 numbers or fewer.
ROW_NUMBERS = 512


def _map_samples(fn, x3):
    """:func:`map_chunks` of ``fn`` over chunks of the samples of ``x3`` (N, L, C)."""
    N, L, C = x3.shape
    return map_chunks(fn, N, get_array_module(x3), rows_per_item=L * C,
                      chunk_rows=CHUNK_NUMBERS, min_rows=MIN_CHUNK_NUMBERS)


def _group_mean(channel_sums, G, count):
    """Per-channel sums (N, C) -> each group's sum / ``count``, repeated over its channels: (N, 1, C)."""
    N, C = channel_sums.shape
    to_groups, spread = _group_matrices(1, C, G, count, channel_sums.dtype)
    return ((channel_sums @ to_groups) @ spread).reshape(N, 1, C)


def _channel_dot(a, b):
    """``sum over pixels of a * b`` per sample and channel: (N, L, C) x 2 -> (N, C), no temporary."""
    return get_array_module(a).einsum("nlc,nlc->nc", a, b)


def _pixels_per_row(L, C):
    """How many of the L pixels of C channels :func:`_normalise` puts in a row: the most, as a
    divisor of L, that keep a row within ``ROW_NUMBERS`` numbers (at least 1)."""
    return max(k for k in range(1, max(ROW_NUMBERS // C, 1) + 1) if L % k == 0)


@functools.lru_cache
def _group_matrices(k, C, G, count, dtype):
    """For rows of k pixels of C channels in G groups: ``to_groups`` (k*C, G), whose product
    with a row's per-channel sums is each group's sum / ``count``, and ``spread`` (G, k*C),
    whose product with per-group values repeats each over its channels, k times."""
    groups = np.tile(np.repeat(np.arange(G), C // G), k)  # the group of each number of a row
    spread = (np.arange(G)[:, None] == groups).astype(dtype)
    return np.ascontiguousarray(spread.T / count), spread


def _normalise(x3, gamma, beta, G, eps, out, mean, inv_std, negate=False):
    """Group-normalise ``x3`` (n, L, C) into ``out``, its statistics into ``mean``, ``inv_std`` (n, 1, C).

    With ``negate`` the output is the normalised values' negation, at no extra cost (for
    :func:`swish_of_negated_into`). The passes over the pixels see them as (n, L / k, k * C),
    rows of k pixels (see ``ROW_NUMBERS``), and the statistics as (n, 1, k * C), each
    repeated k times. Group sums and their spreading over the channels are small matrix
    products (:func:`_group_matrices`), which cost less than NumPy's reshapes and reductions.
    """
    n, L, C = x3.shape
    k = _pixels_per_row(L, C)
    to_groups, spread = _group_matrices(k, C, G, L * (C // G), x3.dtype)
    x_rows, out_rows = x3.reshape(n, L // k, k * C), out.reshape(n, L // k, k * C)
    mean_row = (pixel_sums(x_rows) @ to_groups) @ spread  # (n, k * C)
    mean[:, 0] = mean_row[:, :C]
    np.subtract(x_rows, mean_row[:, None], out=out_rows)
    variance = _channel_dot(out_rows, out_rows) @ to_groups  # (n, G), biased
    variance += eps
    inv_std_row = np.reciprocal(np.sqrt(variance, out=variance)) @ spread
    inv_std[:, 0] = inv_std_row[:, :C]
    scale_row = (inv_std_row.reshape(n, k, C) * (-gamma if negate else gamma)).reshape(n, 1, k * C)
    out_rows *= scale_row  # xhat * gamma, in one pass
    beta_row = np.tile(beta, k)
    if negate:
        out_rows -= beta_row
    else:
        out_rows += beta_row


def group_norm_forward(x, gamma, beta, G, eps=1e-5):
    """Normalise ``x`` (N, ..., C) in G groups, then scale by ``gamma`` and shift by ``beta``.

    Returns ``(out, cache)``. Samples are independent, so chunks of the batch run on all cores;
    each chunk builds its normalised input in its slice of the output.
    """
    xp = get_array_module(x)
    if xp is not np:
        if not grad_enabled():
            return fused.group_norm_inference(x, gamma, beta, G, eps), None
        return fused.group_norm_forward(x, gamma, beta, G, eps)
    N, C = x.shape[0], x.shape[-1]
    x3 = x.reshape(N, -1, C)
    out = memory.empty_like(x3)
    mean, inv_std = xp.empty((N, 1, C), dtype=x.dtype), xp.empty((N, 1, C), dtype=x.dtype)

    def chunk(start, stop):
        _normalise(x3[start:stop], gamma, beta, G, eps, out[start:stop], mean[start:stop], inv_std[start:stop])

    _map_samples(chunk, x3)
    return out.reshape(x.shape), (x3, mean, inv_std, gamma, G)


def group_norm_swish_forward(x, gamma, beta, G, eps=1e-5, keep_normalised=False):
    """``swish(group_norm(x))``, each chunk's Swish done while its normalised values are in cache.

    Returns ``(out, normalised, cache)``, ``normalised`` (the GroupNorm output) only with
    ``keep_normalised`` (else None). On NumPy the sigmoid is not kept: backward recomputes
    it with the normalised values, chunk by chunk (one activation-sized array fewer per
    layer in training). Without ``keep_normalised`` each chunk is normalised straight
    into its negation, from which the Swish takes three passes instead of four.
    """
    xp = get_array_module(x)
    if xp is not np:
        if not grad_enabled():
            if keep_normalised:
                return (*fused.group_norm_inference(x, gamma, beta, G, eps, swish=True, keep_normalised=True), None)
            return fused.group_norm_inference(x, gamma, beta, G, eps, swish=True), None, None
        normalised, cache = fused.group_norm_forward(x, gamma, beta, G, eps)
        s, out = fused.swish_forward(normalised)
        return out, normalised if keep_normalised else None, (cache, s, out)
    N, C = x.shape[0], x.shape[-1]
    x3 = x.reshape(N, -1, C)
    out = memory.empty_like(x3)
    normalised = memory.empty_like(x3) if keep_normalised else out  # Swish then runs in place
    mean, inv_std = xp.empty((N, 1, C), dtype=x.dtype), xp.empty((N, 1, C), dtype=x.dtype)

    def chunk(start, stop):
        n_c = normalised[start:stop]
        stats = mean[start:stop], inv_std[start:stop]
        denominator = scratch("swish denominator", n_c.shape, n_c.dtype)
        if keep_normalised:
            _normalise(x3[start:stop], gamma, beta, G, eps, n_c, *stats)
            swish_into(n_c, out[start:stop], denominator)
        else:  # out holds -n, which spares the Swish a pass
            _normalise(x3[start:stop], gamma, beta, G, eps, n_c, *stats, negate=True)
            swish_of_negated_into(n_c, n_c, denominator)

    _map_samples(chunk, x3)
    return (out.reshape(x.shape), normalised.reshape(x.shape) if keep_normalised else None,
            (x3, mean, inv_std, gamma, beta, G))


def _recomputed_xhat(x3, mean, inv_std, start, stop):
    """The normalised input ``(x - mean) * inv_std`` of samples ``start:stop``, in a scratch array."""
    xhat = scratch("group norm xhat", (stop - start, *x3.shape[1:]), x3.dtype)
    np.subtract(x3[start:stop], mean[start:stop], out=xhat)
    xhat *= inv_std[start:stop]
    return xhat


def _backward_chunk(dout_c, xhat_c, inv_std_c, gamma, G, dx_c):
    """GroupNorm's input gradient for one chunk of whole samples, into ``dx_c``.

    ``dout_c`` and ``xhat_c`` (n, L, C); returns the chunk's ``(dgamma, dbeta)``.
    """
    _, L, C = xhat_c.shape
    count = L * (C // G)
    sum_dout = pixel_sums(dout_c)  # (n, C)
    sum_dout_xhat = _channel_dot(dout_c, xhat_c)  # (n, C)
    mean_dxhat = _group_mean(sum_dout * gamma, G, count)
    mean_dxhat_xhat = _group_mean(sum_dout_xhat * gamma, G, count)
    get_array_module(dx_c).multiply(dout_c, gamma * inv_std_c, out=dx_c)
    dx_c -= xhat_c * (mean_dxhat_xhat * inv_std_c)
    dx_c -= mean_dxhat * inv_std_c
    return sum_dout_xhat.sum(axis=0), sum_dout.sum(axis=0)


def _sum_partials(partials):
    return sum(dgamma for dgamma, _ in partials), sum(dbeta for _, dbeta in partials)


def group_norm_backward(dout, cache):
    """Gradients ``(dx, dgamma, dbeta)`` of :func:`group_norm_forward`."""
    xp = get_array_module(dout)
    if xp is not np:
        return fused.group_norm_backward(dout, cache)
    x3, mean, inv_std, gamma, G = cache
    dout3 = dout.reshape(x3.shape)
    dx = memory.empty_like(x3)

    def chunk(start, stop):
        xhat = _recomputed_xhat(x3, mean, inv_std, start, stop)
        return _backward_chunk(dout3[start:stop], xhat, inv_std[start:stop], gamma, G, dx[start:stop])

    dgamma, dbeta = _sum_partials(_map_samples(chunk, x3))
    return dx.reshape(dout.shape), dgamma, dbeta


def group_norm_swish_backward(dout, dnormalised, cache):
    """Gradients ``(dx, dgamma, dbeta)`` of :func:`group_norm_swish_forward`, given the gradient
    ``dout`` of its output and (or None) ``dnormalised`` of its normalised values.

    With ``n`` the normalised values and ``s = sigmoid(n)``, Swish's derivative is
    ``s * (1 + n * (1 - s))``. On NumPy each chunk recomputes ``xhat``, ``n`` and ``s`` from the
    input and the statistics, in scratch arrays, and goes straight on to GroupNorm's gradient.
    """
    xp = get_array_module(dout)
    if xp is not np:
        gn_cache, s, out = cache
        dn = swish_backward(s, out, dout)
        if dnormalised is not None:
            dn += dnormalised
        return group_norm_backward(dn, gn_cache)
    x3, mean, inv_std, gamma, beta, G = cache
    dout3 = dout.reshape(x3.shape)
    dnormalised3 = None if dnormalised is None else dnormalised.reshape(x3.shape)
    dx = memory.empty_like(x3)

    def chunk(start, stop):
        shape, dtype = (stop - start, *x3.shape[1:]), x3.dtype
        xhat = _recomputed_xhat(x3, mean, inv_std, start, stop)
        n = xp.multiply(xhat, gamma, out=scratch("group norm output", shape, dtype))
        n += beta
        s = sigmoid(n, out=scratch("swish sigmoid", shape, dtype))
        dn = xp.subtract(1.0, s, out=scratch("group norm output gradient", shape, dtype))
        dn *= n
        dn += 1.0
        dn *= s  # Swish's derivative
        dn *= dout3[start:stop]
        if dnormalised3 is not None:
            dn += dnormalised3[start:stop]
        return _backward_chunk(dn, xhat, inv_std[start:stop], gamma, G, dx[start:stop])

    dgamma, dbeta = _sum_partials(_map_samples(chunk, x3))
    return dx.reshape(dout.shape), dgamma, dbeta


class GroupNorm(Module):
    """Group normalisation with a learnt per-channel scale and shift.

    Shapes: x (N, H, W, C) or (N, C) -> out, same shape; weight, bias (C,).
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, dtype=np.float32):
        if num_channels % num_groups:
            raise ValueError(f"{num_channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = Parameter(np.ones(num_channels, dtype=dtype))
        self.bias = Parameter(np.zeros(num_channels, dtype=dtype))

    def forward(self, x):
        out, cache = group_norm_forward(x, self.weight.data, self.bias.data, self.num_groups, self.eps)
        self.save_for_backward(cache)
        return out

    def backward(self, dout):
        (cache,) = self.saved()
        dx, dgamma, dbeta = group_norm_backward(dout, cache)
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        return dx


class GroupNormSwish(GroupNorm):
    """``swish(GroupNorm(x))`` as one layer: the pair that opens a residual block.

    Shapes: x (N, H, W, C) or (N, C) -> out, same shape; weight, bias (C,), named as a
    GroupNorm's. With ``keep_normalised=True`` forward returns ``(normalised, out)``, the
    GroupNorm output too (a residual block's skip conv reads it), and backward takes the
    gradients of both, ``backward(dout, dnormalised)``.

    On NumPy each chunk of the batch is normalised and then put through the Swish while
    it is in cache, and without ``keep_normalised`` the Swish writes over the normalised
    values: one pass over memory fewer than the two layers apart, and one array fewer.
    Training keeps only the input and the per-group statistics: backward recomputes the
    normalised values and their sigmoid chunk by chunk, so the sigmoid, an activation-sized
    array, is not kept either.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, keep_normalised=False, dtype=np.float32):
        super().__init__(num_groups, num_channels, eps=eps, dtype=dtype)
        self.keep_normalised = keep_normalised

    def forward(self, x):
        out, normalised, cache = group_norm_swish_forward(
            x, self.weight.data, self.bias.data, self.num_groups, self.eps, self.keep_normalised)
        self.save_for_backward(cache)
        return (normalised, out) if self.keep_normalised else out

    def backward(self, dout, dnormalised=None):
        (cache,) = self.saved()
        dx, dgamma, dbeta = group_norm_swish_backward(dout, dnormalised, cache)
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        return dx
