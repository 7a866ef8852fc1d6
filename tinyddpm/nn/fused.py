"""Fused CUDA kernels: the GPU's version of the element-wise and reduction work.

Written with plain array operations, a layer launches one GPU kernel per
operation, and each launch costs some microseconds of Python and driver time:
more than the arithmetic of most tensors in this network. On CuPy, Swish,
GroupNorm, Adam and the bias gradients therefore call the functions here, each
a handful of kernels that CuPy compiles once per dtype and caches on disk.

Every function computes what the NumPy code beside its caller computes, in the
same order of operations, so the gradient checks and the PyTorch parity tests
hold the GPU path to the same bounds. CuPy is imported on first use only, so
this module loads without it.
"""

import functools


@functools.cache
def _cupy():
    import cupy

    return cupy


@functools.cache
def _kernel(kind, in_params, out_params, *body, name):
    """An ``ElementwiseKernel`` (kind "map") or ``ReductionKernel`` (kind "reduce"), built once."""
    cupy = _cupy()
    if kind == "map":
        return cupy.ElementwiseKernel(in_params, out_params, body[0], f"tinyddpm_{name}")
    map_expr, reduce_expr, post_map_expr, identity = body
    return cupy.ReductionKernel(in_params, out_params, map_expr, reduce_expr, post_map_expr, identity,
                                f"tinyddpm_{name}")


def _scalar(value, like):
    """A Python number as a scalar of ``like``'s dtype, so kernels stay in that precision."""
    return like.dtype.type(value)


# --- Swish ------------------------------------------------------------------------------------


def swish_forward(x):
    """``(sigmoid(x), x * sigmoid(x))`` in one pass; sigmoid as ``0.5 tanh(x / 2) + 0.5``."""
    kernel = _kernel("map", "T x", "T s, T out",
                     "s = tanh(x * (T)0.5) * (T)0.5 + (T)0.5; out = x * s;", name="swish_forward")
    return kernel(x)


def swish_backward(s, out, dout):
    """``dout * (s + out (1 - s))``, the derivative of swish (from its sigmoid and output) times ``dout``."""
    kernel = _kernel("map", "T s, T out, T dout", "T grad",
                     "grad = (((T)1 - s) * out + s) * dout;", name="swish_backward")
    return kernel(s, out, dout)


# --- Adam ---------------------------------------------------------------------------------------


def adam_update(param, grad, m, v, beta1, beta2, step_size, eps_hat):
    """One Adam step in place on ``param``, ``m`` and ``v`` (see ``optim.py`` for the algebra)."""
    kernel = _kernel(
        "map", "T g, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, T step_size, T eps_hat",
        "T p, T m, T v",
        "m = m * beta1 + one_minus_beta1 * g;"
        "v = v * beta2 + one_minus_beta2 * (g * g);"
        "p -= m / (sqrt(v) + eps_hat) * step_size;",
        name="adam_update")
    kernel(grad, *(_scalar(value, param) for value in (beta1, 1.0 - beta1, beta2, 1.0 - beta2, step_size, eps_hat)),
           param, m, v)


# --- sums over rows (bias gradients) ------------------------------------------------------------


def sum_rows(a):
    """``a.sum(axis=0)`` of a tall (M, K) matrix, as one matrix-vector product.

    CuPy's reduction gives each of the K columns one block, which leaves most of the
    GPU idle when K is a few hundred and M a hundred thousand; cuBLAS does not.
    """
    cupy = _cupy()
    return cupy.ones(a.shape[0], dtype=a.dtype) @ a


# --- GroupNorm ------------------------------------------------------------------------------------


def group_norm_forward(x, gamma, beta, G, eps):
    """GroupNorm of ``x`` (N, ..., C) in 4 kernels: group mean, variance, 1/std, and the output.

    Works on ``x`` viewed as (N, L, G, C/G), the statistics as (N, 1, G, 1). Returns
    ``(out, cache)``; the cache is this module's own, read by :func:`group_norm_backward`.
    """
    cupy = _cupy()
    N, C = x.shape[0], x.shape[-1]
    x4 = x.reshape(N, -1, G, C // G)
    inv_count = _scalar(1.0 / (x4.shape[1] * x4.shape[3]), x)
    mean = _kernel("reduce", "T x, T inv_count", "T y", "x * inv_count", "a + b", "y = a", "0",
                   name="mean")(x4, inv_count, axis=(1, 3), keepdims=True)
    var = _kernel("reduce", "T x, T mean, T inv_count", "T y", "(x - mean) * (x - mean) * inv_count",
                  "a + b", "y = a", "0", name="centred_mean_square")(x4, mean, inv_count, axis=(1, 3), keepdims=True)
    inv_std = _kernel("map", "T var, T eps", "T inv_std", "inv_std = (T)1 / sqrt(var + eps);",
                      name="inverse_std")(var, _scalar(eps, x))
    xhat, out = cupy.empty_like(x4), cupy.empty_like(x4)
    _kernel("map", "T x, T mean, T inv_std, T gamma, T beta", "T xhat, T out",
            "xhat = (x - mean) * inv_std; out = xhat * gamma + beta;", name="group_norm_out")(
        x4, mean, inv_std, gamma.reshape(G, -1), beta.reshape(G, -1), xhat, out)
    return out.reshape(x.shape), (xhat, inv_std, gamma, G)


def group_norm_backward(dout, cache):
    """Gradients ``(dx, dgamma, dbeta)`` of :func:`group_norm_forward`:

    ``dx = inv_std (dxhat - mean(dxhat) - xhat mean(dxhat xhat))`` with ``dxhat = dout gamma``
    and group means over the (L, C/G) axes; ``dgamma``, ``dbeta`` sum over samples and pixels.
    """
    xhat, inv_std, gamma, G = cache
    dout4 = dout.reshape(xhat.shape)
    gamma4 = gamma.reshape(G, -1)
    inv_count = _scalar(1.0 / (xhat.shape[1] * xhat.shape[3]), xhat)
    mean_dxhat = _kernel("reduce", "T dout, T gamma, T inv_count", "T y", "dout * gamma * inv_count",
                         "a + b", "y = a", "0", name="mean_dxhat")(
        dout4, gamma4, inv_count, axis=(1, 3), keepdims=True)
    mean_dxhat_xhat = _kernel("reduce", "T dout, T gamma, T xhat, T inv_count", "T y",
                              "dout * gamma * xhat * inv_count", "a + b", "y = a", "0", name="mean_dxhat_xhat")(
        dout4, gamma4, xhat, inv_count, axis=(1, 3), keepdims=True)
    dx = _kernel("map", "T dout, T gamma, T xhat, T inv_std, T mean_dxhat, T mean_dxhat_xhat", "T dx",
                 "dx = (dout * gamma - mean_dxhat - xhat * mean_dxhat_xhat) * inv_std;", name="group_norm_dx")(
        dout4, gamma4, xhat, inv_std, mean_dxhat, mean_dxhat_xhat)
    # Per sample and channel first (N*C sums, enough to fill the GPU), then over the samples.
    per_sample = _kernel("reduce", "T dout, T xhat", "T y", "dout * xhat", "a + b", "y = a", "0",
                         name="dot_over_pixels")(dout4, xhat, axis=1)
    dgamma = per_sample.sum(axis=0).reshape(-1)
    dbeta = dout4.sum(axis=1).sum(axis=0).reshape(-1)
    return dx.reshape(dout.shape), dgamma, dbeta


# --- im2col -------------------------------------------------------------------------------------


def im2col(x, KH, KW, stride, padding):
    """The patch matrix of ``conv.im2col`` (N*OH*OW, KH*KW*C), built in one kernel from the
    unpadded ``x`` (N, H, W, C): positions in the padding read as zero, so no padded copy of
    ``x`` is made. ``padding`` is ``((top, bottom), (left, right))``.

    Each thread copies a run of V consecutive channels of one patch position (V = 4 where C
    allows), so that neighbouring threads read and write neighbouring memory and the integer
    index arithmetic, which costs more than the copy itself, is done once per run.
    """
    cupy = _cupy()
    x = cupy.ascontiguousarray(x)
    N, H, W, C = x.shape
    (top, bottom), (left, right) = padding
    OH = (H + top + bottom - KH) // stride + 1
    OW = (W + left + right - KW) // stride + 1
    cols = cupy.empty((N * OH * OW, KH * KW * C), dtype=x.dtype)
    V = 4 if C % 4 == 0 else 1
    runs = cols.size // V
    if runs >= 2**31:
        raise ValueError(f"im2col of {x.shape} is too large for 32-bit indices; use a smaller batch")
    kernel = _kernel(
        "map", "raw T x, int32 H, int32 W, int32 C, int32 OH, int32 OW, int32 KW, int32 KHW, "
               "int32 stride, int32 top, int32 left, int32 V", "raw T cols",
        """
        int runs_per_position = C / V;
        int run = (int)i % runs_per_position, t = (int)i / runs_per_position;  // t: (row, a, b)
        int ab = t % KHW, row = t / KHW;
        int a = ab / KW, b = ab % KW;
        int ow = row % OW, oh = (row / OW) % OH, n = row / (OW * OH);
        int h = oh * stride + a - top, w = ow * stride + b - left;
        long long dst = (long long)t * C + run * V;
        if (h >= 0 && h < H && w >= 0 && w < W) {
            long long src = (((long long)n * H + h) * W + w) * C + run * V;
            for (int v = 0; v < V; ++v) cols[dst + v] = x[src + v];
        } else {
            for (int v = 0; v < V; ++v) cols[dst + v] = (T)0;
        }
        """, name="im2col")
    kernel(x, H, W, C, OH, OW, KW, KH * KW, stride, top, left, V, cols, size=runs)
    return cols
