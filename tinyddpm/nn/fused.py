"""Fused CUDA kernels: the GPU's version of the element-wise and reduction work.

Written with plain array operations, a layer launches one GPU kernel per
operation, and each launch costs some microseconds of Python and driver time:
more than the arithmetic of most tensors in this network. On CuPy, Swish,
GroupNorm, Adam, im2col and the bias gradients therefore call the functions here,
each one to a handful of kernels that CuPy compiles once per dtype and caches on disk.

Every function computes what the NumPy code beside its caller computes, up to
rounding (the GPU's sigmoid is ``0.5 tanh(x / 2) + 0.5``, the CPU's ``1 / (1 +
exp(-x))``, whichever each device computes faster), and the gradient checks and
the PyTorch parity tests hold the GPU path to the same bounds as the CPU's. CuPy is
imported on first use only, so this module loads without it.
"""

import functools

import numpy as np

from tinyddpm.nn.matmul import matmul


@functools.cache
def _cupy():
    import cupy

    return cupy


@functools.cache
def _kernel(in_params, out_params, operation, name):
    """A CuPy ``ElementwiseKernel``, built once."""
    return _cupy().ElementwiseKernel(in_params, out_params, operation, f"tinyddpm_{name}")


def _scalar(value, like):
    """A Python number as a scalar of ``like``'s dtype, so kernels stay in that precision."""
    return like.dtype.type(value)


# --- Swish ------------------------------------------------------------------------------------


def swish_forward(x):
    """``(sigmoid(x), x * sigmoid(x))`` in one pass; sigmoid as ``0.5 tanh(x / 2) + 0.5``."""
    kernel = _kernel("T x", "T s, T out",
                     "s = tanh(x * (T)0.5) * (T)0.5 + (T)0.5; out = x * s;", name="swish_forward")
    return kernel(x)


def swish_backward(s, out, dout):
    """``dout * (s + out (1 - s))``, the derivative of swish (from its sigmoid and output) times ``dout``."""
    kernel = _kernel("T s, T out, T dout", "T grad",
                     "grad = (((T)1 - s) * out + s) * dout;", name="swish_backward")
    return kernel(s, out, dout)


# --- Adam ---------------------------------------------------------------------------------------


def adam_update(param, grad, m, v, beta1, beta2, scalars):
    """One Adam step in place on ``param``, ``m`` and ``v`` (see ``optim.py`` for the algebra).

    ``scalars`` is a float64 device array ``(step_size, eps_hat)``, read by the kernel at run
    time, so a recorded graph of this kernel serves every later step. Each is rounded to
    ``param``'s dtype before use, as a scalar argument of that dtype would be.
    """
    kernel = _kernel(
        "T g, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, raw float64 scalars",
        "T p, T m, T v",
        "m = m * beta1 + one_minus_beta1 * g;"
        "v = v * beta2 + one_minus_beta2 * (g * g);"
        "p -= m / (sqrt(v) + (T)scalars[1]) * (T)scalars[0];",
        name="adam_update")
    kernel(grad, *(_scalar(value, param) for value in (beta1, 1.0 - beta1, beta2, 1.0 - beta2)),
           scalars, param, m, v)


# --- sums over rows (bias gradients) ------------------------------------------------------------


def sum_rows(a):
    """``a.sum(axis=0)`` of a tall (M, K) matrix, as one matrix-vector product.

    CuPy's reduction gives each of the K columns one block, which leaves most of the
    GPU idle when K is a few hundred and M a hundred thousand; cuBLAS does not.
    """
    ones = _cupy().ones((1, a.shape[0]), dtype=a.dtype)
    return matmul(ones, a).reshape(a.shape[1])


# --- softmax ----------------------------------------------------------------------------------

# One warp per row: the row's max, then exp(score - max) written back and summed, then each
# divided by the sum, the sums across the warp by shuffles. A row (the keys of one query, a
# few hundred numbers) stays in L1 between the three loops, so memory sees one read and one
# write, where the five kernels of the array-by-array softmax read and write it several times.
_SOFTMAX_SOURCE = r"""
extern "C" __global__ void softmax_rows(T* scores, long long rows, int L) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;  // whole warps: a warp is one row
    int lane = threadIdx.x % 32;
    T* r = scores + row * L;
    T m = r[0];
    for (int j = lane; j < L; j += 32) m = max(m, r[j]);
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    T sum = 0;
    for (int j = lane; j < L; j += 32) {
        T e = exp(r[j] - m);
        r[j] = e;
        sum += e;
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    for (int j = lane; j < L; j += 32) r[j] = r[j] / sum;
}
"""
ROWS_PER_BLOCK = 8  # warps of a 256-thread block


def softmax_rows(scores):
    """Softmax over the last axis of the contiguous ``scores``, in place (returned)."""
    if not scores.flags.c_contiguous:
        raise ValueError("softmax_rows works in place on a contiguous array")
    L = scores.shape[-1]
    rows = scores.size // L
    _raw_kernel(_SOFTMAX_SOURCE, "softmax_rows", scores.dtype)(
        (-(-rows // ROWS_PER_BLOCK),), (32 * ROWS_PER_BLOCK,), (scores, np.int64(rows), np.int32(L)))
    return scores


# --- GroupNorm ------------------------------------------------------------------------------------

# One thread block per (sample, group): the group's L * Cg values sit at x[n, l, g * Cg + j] of
# x (N, L, C). Sums are taken in double precision and reduced through shared memory. CuPy's
# generic reductions over the (L, Cg) axes of a (N, L, G, Cg) view were 4x slower.
_GROUP_NORM_SOURCE = r"""
__device__ double block_sum(double value, double* shared) {
    shared[threadIdx.x] = value;
    __syncthreads();
    for (int s = 512; s > 0; s >>= 1) {
        if (threadIdx.x < s && threadIdx.x + s < blockDim.x) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    double total = shared[0];
    __syncthreads();
    return total;
}

// The mean and 1 / sqrt(variance + eps) of each group, the variance taken about the mean.
extern "C" __global__ void group_norm_stats(const T* x, T* mean, T* inv_std, int L, int C, int Cg, double eps) {
    __shared__ double shared[1024];
    int G = C / Cg, n = blockIdx.x / G, g = blockIdx.x % G, count = L * Cg;
    const T* group = x + (long long)n * L * C + g * Cg;
    double sum = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) sum += group[(long long)(i / Cg) * C + i % Cg];
    double m = block_sum(sum, shared) / count;
    double squares = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        double d = group[(long long)(i / Cg) * C + i % Cg] - m;
        squares += d * d;
    }
    double variance = block_sum(squares, shared) / count;
    if (threadIdx.x == 0) {
        mean[blockIdx.x] = (T)m;
        inv_std[blockIdx.x] = (T)(1.0 / sqrt(variance + eps));
    }
}

// Each thread stays on one channel j of the group (the block's first `stride` threads, a
// multiple of Cg), summing dout and dout * xhat over its pixels. From those: per (sample,
// channel) the partial dbeta and dgamma, and per group the means of dxhat = dout * gamma and
// of dxhat * xhat.
extern "C" __global__ void group_norm_backward_sums(
        const T* dout, const T* xhat, const T* gamma, T* mean_dxhat, T* mean_dxhat_xhat,
        T* dgamma_part, T* dbeta_part, int L, int C, int Cg) {
    __shared__ double shared[1024], dout_sums[1024], dout_xhat_sums[1024];
    int G = C / Cg, n = blockIdx.x / G, g = blockIdx.x % G, count = L * Cg;
    int stride = blockDim.x - blockDim.x % Cg, j = threadIdx.x % Cg;
    long long offset = (long long)n * L * C + g * Cg + j;
    double sum_dout = 0.0, sum_dout_xhat = 0.0, gamma_j = 0.0;
    if (threadIdx.x < stride) {
        gamma_j = gamma[g * Cg + j];
        for (int i = threadIdx.x; i < count; i += stride) {
            long long at = offset + (long long)(i / Cg) * C;
            double d = dout[at];
            sum_dout += d;
            sum_dout_xhat += d * xhat[at];
        }
    }
    dout_sums[threadIdx.x] = sum_dout;
    dout_xhat_sums[threadIdx.x] = sum_dout_xhat;
    __syncthreads();
    if (threadIdx.x < Cg) {
        double dbeta = 0.0, dgamma = 0.0;
        for (int t = threadIdx.x; t < stride; t += Cg) {
            dbeta += dout_sums[t];
            dgamma += dout_xhat_sums[t];
        }
        dbeta_part[(long long)n * C + g * Cg + threadIdx.x] = (T)dbeta;
        dgamma_part[(long long)n * C + g * Cg + threadIdx.x] = (T)dgamma;
    }
    double sum_dxhat = block_sum(sum_dout * gamma_j, shared);
    double sum_dxhat_xhat = block_sum(sum_dout_xhat * gamma_j, shared);
    if (threadIdx.x == 0) {
        mean_dxhat[blockIdx.x] = (T)(sum_dxhat / count);
        mean_dxhat_xhat[blockIdx.x] = (T)(sum_dxhat_xhat / count);
    }
}
"""


@functools.cache
def _raw_kernel(source, name, dtype):
    """A CuPy ``RawKernel`` of ``source`` with ``T`` the C type of ``dtype``, built once."""
    ctype = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[np.dtype(dtype)]
    return _cupy().RawKernel(f"typedef {ctype} T;\n" + source, name)


def _group_norm_kernel(name, dtype):
    return _raw_kernel(_GROUP_NORM_SOURCE, name, dtype)


def _group_threads(Cg):
    """Threads per group's block: 256, or one per channel where a group has more channels."""
    if Cg > 1024:
        raise ValueError(f"GroupNorm on the GPU takes at most 1024 channels per group, got {Cg}")
    return 256 if Cg <= 256 else Cg


def _group_statistics(x, G, eps):
    """``x`` (N, ..., C) viewed as (N, L, G, C/G), and each group's mean and 1 / std, (N, 1, G, 1)."""
    cupy = _cupy()
    N, C = x.shape[0], x.shape[-1]
    x3 = cupy.ascontiguousarray(x).reshape(N, -1, C)
    L, Cg = x3.shape[1], C // G
    mean, inv_std = cupy.empty((N, 1, G, 1), dtype=x.dtype), cupy.empty((N, 1, G, 1), dtype=x.dtype)
    _group_norm_kernel("group_norm_stats", x.dtype)(
        (N * G,), (_group_threads(Cg),), (x3, mean, inv_std, np.int32(L), np.int32(C), np.int32(Cg), np.float64(eps)))
    return x3.reshape(N, L, G, Cg), mean, inv_std


def group_norm_forward(x, gamma, beta, G, eps):
    """GroupNorm of ``x`` (N, ..., C) in 2 kernels: the groups' statistics, then the output.

    Works on ``x`` viewed as (N, L, G, C/G), the statistics as (N, 1, G, 1). Returns
    ``(out, cache)``; the cache is this module's own, read by :func:`group_norm_backward`.
    """
    x4, mean, inv_std = _group_statistics(x, G, eps)
    Cg = x4.shape[-1]
    xhat, out = _cupy().empty_like(x4), _cupy().empty_like(x4)
    _kernel("T x, T mean, T inv_std, T gamma, T beta", "T xhat, T out",
            "xhat = (x - mean) * inv_std; out = xhat * gamma + beta;", name="group_norm_out")(
        x4, mean, inv_std, gamma.reshape(G, Cg), beta.reshape(G, Cg), xhat, out)
    return out.reshape(x.shape), (xhat, inv_std, gamma, G)


# Without grad nothing is kept for backward, so the output kernel writes only what the next
# layers read: the normalised values, their Swish, or both (one to three arrays fewer than
# GroupNorm's xhat and output followed by Swish's sigmoid and output). The arithmetic is that
# of group_norm_forward and swish_forward, statement for statement.
_NORMALISED = "T xhat = (x - mean) * inv_std; T n = xhat * gamma + beta;"
_SWISH_OF_N = "T s = tanh(n * (T)0.5) * (T)0.5 + (T)0.5;"


def group_norm_inference(x, gamma, beta, G, eps, swish=False, keep_normalised=False):
    """For a forward without grad: ``group_norm(x)`` (N, ..., C), or with ``swish`` its Swish,
    or with ``keep_normalised`` too ``(swish, normalised)``; the statistics and one kernel."""
    x4, mean, inv_std = _group_statistics(x, G, eps)
    Cg = x4.shape[-1]
    args = (x4, mean, inv_std, gamma.reshape(G, Cg), beta.reshape(G, Cg))
    params = "T x, T mean, T inv_std, T gamma, T beta"
    if not swish:
        out = _kernel(params, "T out", _NORMALISED + "out = n;", name="group_norm_inference")(*args)
        return out.reshape(x.shape)
    if not keep_normalised:
        out = _kernel(params, "T out", _NORMALISED + _SWISH_OF_N + "out = n * s;",
                      name="group_norm_swish_inference")(*args)
        return out.reshape(x.shape)
    normalised, out = _kernel(params, "T normalised, T out", _NORMALISED + _SWISH_OF_N + "normalised = n; out = n * s;",
                              name="group_norm_swish_kept_inference")(*args)
    return out.reshape(x.shape), normalised.reshape(x.shape)


def group_norm_backward(dout, cache):
    """Gradients ``(dx, dgamma, dbeta)`` of :func:`group_norm_forward`:

    ``dx = inv_std (dxhat - mean(dxhat) - xhat mean(dxhat xhat))`` with ``dxhat = dout gamma``
    and group means over the (L, C/G) axes; ``dgamma``, ``dbeta`` sum over samples and pixels.
    """
    cupy = _cupy()
    xhat, inv_std, gamma, G = cache
    N, L, _, Cg = xhat.shape
    C = G * Cg
    dout4 = cupy.ascontiguousarray(dout).reshape(xhat.shape)
    mean_dxhat, mean_dxhat_xhat = cupy.empty_like(inv_std), cupy.empty_like(inv_std)
    dgamma_part, dbeta_part = cupy.empty((N, C), dtype=xhat.dtype), cupy.empty((N, C), dtype=xhat.dtype)
    _group_norm_kernel("group_norm_backward_sums", xhat.dtype)(
        (N * G,), (_group_threads(Cg),),
        (dout4, xhat, gamma, mean_dxhat, mean_dxhat_xhat, dgamma_part, dbeta_part,
         np.int32(L), np.int32(C), np.int32(Cg)))
    dx = _kernel("T dout, T gamma, T xhat, T inv_std, T mean_dxhat, T mean_dxhat_xhat", "T dx",
                 "dx = (dout * gamma - mean_dxhat - xhat * mean_dxhat_xhat) * inv_std;", name="group_norm_dx")(
        dout4, gamma.reshape(G, Cg), xhat, inv_std, mean_dxhat, mean_dxhat_xhat)
    return dx.reshape(dout.shape), dgamma_part.sum(axis=0), dbeta_part.sum(axis=0)


# --- im2col -------------------------------------------------------------------------------------


IM2COL_RUNS = (8, 4, 1)  # channels a thread of im2col copies: the first of these that divides C


def im2col(x, KH, KW, stride, padding):
    """The patch matrix of ``conv.im2col`` (N*OH*OW, KH*KW*C), built in one kernel from the
    unpadded ``x`` (N, H, W, C): positions in the padding read as zero, so no padded copy of
    ``x`` is made. ``padding`` is ``((top, bottom), (left, right))``.

    Each thread copies a run of V consecutive channels of one patch position (``IM2COL_RUNS``),
    so that neighbouring threads read and write neighbouring memory and the integer
    index arithmetic, which costs more than the copy itself, is done once per run. Where a run
    is a whole number of 16-byte words (V float32s or float64s, at offsets that are multiples of
    V numbers, from CuPy's 256-byte aligned memory), it moves as 16-byte words: one load and one
    store each instead of V of them.
    """
    cupy = _cupy()
    x = cupy.ascontiguousarray(x)
    N, H, W, C = x.shape
    (top, bottom), (left, right) = padding
    OH = (H + top + bottom - KH) // stride + 1
    OW = (W + left + right - KW) // stride + 1
    cols = cupy.empty((N * OH * OW, KH * KW * C), dtype=x.dtype)
    V = next(v for v in IM2COL_RUNS if C % v == 0)
    words = V * x.itemsize // 16 if (V * x.itemsize) % 16 == 0 and x.data.ptr % 16 == 0 else 0
    runs = cols.size // V
    if runs >= 2**31:
        raise ValueError(f"im2col of {x.shape} is too large for 32-bit indices; use a smaller batch")
    kernel = _kernel(
        "raw T x, int32 H, int32 W, int32 C, int32 OH, int32 OW, int32 KW, int32 KHW, "
        "int32 stride, int32 top, int32 left, int32 V, int32 words", "raw T cols",
        """
        int runs_per_position = C / V;
        int run = (int)i % runs_per_position, t = (int)i / runs_per_position;  // t: (row, a, b)
        int ab = t % KHW, row = t / KHW;
        int a = ab / KW, b = ab % KW;
        int ow = row % OW, oh = (row / OW) % OH, n = row / (OW * OH);
        int h = oh * stride + a - top, w = ow * stride + b - left;
        long long dst = (long long)t * C + run * V;
        bool inside = h >= 0 && h < H && w >= 0 && w < W;
        long long src = inside ? (((long long)n * H + h) * W + w) * C + run * V : 0;
        if (words > 0) {
            int4* to = reinterpret_cast<int4*>(&cols[dst]);
            const int4* from = reinterpret_cast<const int4*>(&x[src]);
            for (int q = 0; q < words; ++q) to[q] = inside ? from[q] : make_int4(0, 0, 0, 0);
        } else {
            for (int v = 0; v < V; ++v) cols[dst + v] = inside ? x[src + v] : (T)0;
        }
        """, name="im2col_words")
    kernel(x, H, W, C, OH, OW, KW, KH * KW, stride, top, left, V, words, cols, size=runs)
    return cols
