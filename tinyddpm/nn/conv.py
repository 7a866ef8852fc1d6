"""2-D convolution on channels-last images, as im2col + one matrix product (or Winograd).

Shapes: input ``x`` (N, H, W, C), weight ``w`` (OC, C, KH, KW) (the PyTorch
layout), bias ``b`` (OC,), output (N, OH, OW, OC).

Forward copies every KH x KW patch of the padded input into one row of a
``cols`` matrix (N*OH*OW, KH*KW*C), read through a strided view so no Python
loop touches pixels, and multiplies it by the weight as a (KH*KW*C, OC) matrix.
Backward is two more products: ``dw = cols^T @ dout`` and, for the input,
``dcols = dout @ w^T`` followed by :func:`col2im`, which adds each row of
``dcols`` back onto the patch it came from (KH*KW strided adds). ``cols`` is 9x
the input, so it is not cached: backward rebuilds it from the saved input.
Every product runs chunk by chunk over the batch on all cores (``parallel.py``):
each chunk pads, unfolds and multiplies its own images, so only a few MB of
``cols`` exist at a time and they are still in cache when the product reads them.

A stride-1 conv takes a faster road to its input gradient: it is the
correlation of the (re-padded) output gradient with the spatially flipped
kernel, again one im2col and one product, which beats nine strided adds over
the whole image.

On NumPy, a 3x3 stride-1 conv padded by one pixel on every side, of images
with even H and W, runs as Winograd's F(2x2, 3x3) instead (``winograd.py``),
which needs 2.25x fewer multiplications but makes more passes over memory to
transform tiles, so it only pays with enough channels. On the 2-core machine
this was measured on (batch 128, the example network's shapes):

- the correlation (forward and input gradient) beats im2col by about 1.4x
  (1.15-1.75x over runs) from 128 input channels up, and, since its temporaries
  live in per-thread scratch buffers, by 1.35x (16 images) to 1.55x (128) at 64
  channels on 32x32 images too (best of 30 calls each);
- the weight gradient beats im2col by 1.25-2.2x when both channel counts are
  at least 64, and loses with 32 or fewer.

Every other conv, and every conv on CuPy, keeps im2col, except a conv with few
output channels (KH*KW*OC <= C, such as the network's last, 128 -> 1), on either
device: it multiplies every input pixel by all KH*KW taps' weights at once, a
(C, KH*KW*OC) matrix, and adds each tap's products in at its offset, which never
copies the input nine times over (``correlate_taps``). Its weight gradient is the
same product read backwards: the output gradient placed at each tap's offset,
times the input.

Padding follows MATLAB's ``"same"``: the output is ceil(H / stride) tall, and an
odd total padding puts the extra row at the bottom (and column at the right).
So 3x3 stride 1 pads 1 on every side, 1x1 pads nothing, and 3x3 stride 2 pads
0 top/left and 1 bottom/right.
"""

import numpy as np

from tinyddpm.backend import get_array_module
from tinyddpm.nn import fused, memory
from tinyddpm.nn.matmul import matmul
from tinyddpm.nn.module import Module, Parameter, prepared_weight
from tinyddpm.nn.parallel import CHUNK_ROWS, map_chunks, scratch
from tinyddpm.nn.winograd import correlate_3x3, correlate_3x3_weight_grad

WINOGRAD_MIN_CHANNELS = 64  # correlate: input channels
WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS = 64  # correlate_weight_grad: input and output channels


def same_padding(size, kernel, stride):
    """MATLAB "same" padding ``(before, after)`` of one spatial axis of length ``size``."""
    out = -(-size // stride)  # ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_hw(x, pad_h, pad_w, out=None):
    """Zero-pad the H and W axes of ``x`` (N, H, W, C) by ``(before, after)`` pairs, into ``out`` if given."""
    if pad_h == (0, 0) and pad_w == (0, 0):
        return x
    xp = get_array_module(x)
    N, H, W, C = x.shape
    Hp, Wp = H + sum(pad_h), W + sum(pad_w)
    if out is None:
        out = xp.zeros((N, Hp, Wp, C), dtype=x.dtype)
    else:  # only the border needs zeros
        out[:, :pad_h[0]] = out[:, Hp - pad_h[1]:] = 0
        out[:, :, :pad_w[0]] = out[:, :, Wp - pad_w[1]:] = 0
    out[:, pad_h[0]:pad_h[0] + H, pad_w[0]:pad_w[0] + W] = x
    return out


def im2col(xpad, KH, KW, stride, out=None):
    """Patches of the padded input ``xpad`` (N, Hp, Wp, C) as rows (N*OH*OW, KH*KW*C), into ``out`` if given.

    Row ``(n, i, j)`` holds ``xpad[n, s*i + a, s*j + b, c]`` at column ``(a, b, c)``.
    """
    xp = get_array_module(xpad)
    N, Hp, Wp, C = xpad.shape
    OH = (Hp - KH) // stride + 1
    OW = (Wp - KW) // stride + 1
    sN, sH, sW, sC = xpad.strides
    patches = xp.lib.stride_tricks.as_strided(
        xpad, shape=(N, OH, OW, KH, KW, C),
        strides=(sN, stride * sH, stride * sW, sH, sW, sC))
    if out is None:
        return patches.reshape(N * OH * OW, KH * KW * C)  # the copy happens here
    xp.copyto(out.reshape(patches.shape), patches)
    return out


def col2im(cols, padded_shape, KH, KW, stride, out=None):
    """The adjoint of :func:`im2col`: add each row of ``cols`` back onto its patch.

    ``cols`` (N*OH*OW, KH*KW*C) -> padded image ``padded_shape`` (N, Hp, Wp, C), into
    ``out`` if given.
    """
    xp = get_array_module(cols)
    N, Hp, Wp, C = padded_shape
    OH = (Hp - KH) // stride + 1
    OW = (Wp - KW) // stride + 1
    patches = cols.reshape(N, OH, OW, KH, KW, C)
    if out is None:
        out = xp.zeros(padded_shape, dtype=cols.dtype)
    else:
        out[...] = 0
    for a in range(KH):
        for b in range(KW):
            out[:, a:a + stride * OH:stride, b:b + stride * OW:stride] += patches[:, :, :, a, b]
    return out


def weight_matrix(w):
    """Weight (OC, C, KH, KW) as the (KH*KW*C, OC) matrix that multiplies ``cols``."""
    OC, C, KH, KW = w.shape
    return w.transpose(2, 3, 1, 0).reshape(KH * KW * C, OC)


def columns(x, KH, KW, stride, padding):
    """``cols`` of ``x`` (N, H, W, C) zero-padded by ``padding``; a 1x1 stride-1 conv needs no copy.

    On NumPy the padded input and ``cols`` are the calling thread's scratch arrays
    (``parallel.scratch``): valid until its next chunk, so they never leave the chunk.
    """
    N, H, W, C = x.shape
    if KH == KW == stride == 1 and padding == ((0, 0), (0, 0)):
        return x.reshape(N * H * W, C)
    if get_array_module(x) is not np:
        return fused.im2col(x, KH, KW, stride, padding)  # one kernel, no padded copy
    Hp, Wp = H + sum(padding[0]), W + sum(padding[1])
    xpad = pad_hw(x, *padding, out=scratch("conv padded input", (N, Hp, Wp, C), x.dtype))
    rows = N * ((Hp - KH) // stride + 1) * ((Wp - KW) // stride + 1)
    return im2col(xpad, KH, KW, stride, out=scratch("conv columns", (rows, KH * KW * C), x.dtype))


def winograd_fits(x, KH, KW, stride, padding):
    """Whether a KH x KW correlation of ``x`` (N, H, W, C) has the shape that ``winograd.py`` takes."""
    _, H, W, _ = x.shape
    return (get_array_module(x) is np and (KH, KW, stride) == (3, 3, 1)
            and padding == ((1, 1), (1, 1)) and H % 2 == 0 and W % 2 == 0)


def correlate(x, w, stride, padding=None, bias=None, add_to=None):
    """The conv: ``x`` (N, H, W, C), ``w`` (OC, C, KH, KW) -> (N, OH, OW, OC).

    ``padding`` is ``((top, bottom), (left, right))``, MATLAB "same" if None. ``bias``, if
    given, is added to every pixel: one vector (OC,), or one per sample (N, OC). With
    ``add_to`` (N, OH, OW, OC) the result is added into that array, which is returned.
    Every road adds both to each chunk of the output while it is in cache (Winograd adds
    the bias to a quarter of its products instead), rather than in passes of their own over
    the whole output.
    """
    if padding is None:
        padding = same_padding(x.shape[1], w.shape[2], stride), same_padding(x.shape[2], w.shape[3], stride)
    if few_outputs(x.shape[3], w.shape[0], *w.shape[2:]):
        return correlate_taps(x, w, stride, padding, bias, add_to)
    if winograd_fits(x, *w.shape[2:], stride, padding) and x.shape[3] >= WINOGRAD_MIN_CHANNELS:
        out = output_array(x, w, (*x.shape[:3], w.shape[0]), add_to)
        return correlate_3x3(x, w, out, accumulate=add_to is not None, bias=bias)
    return correlate_im2col(x, w, stride, padding, bias, add_to)


def output_array(x, w, shape, add_to):
    """The array a conv of ``x`` and ``w`` writes its (N, OH, OW, OC) output into: ``add_to``, or a new one."""
    if add_to is not None:
        if add_to.shape != shape:
            raise ValueError(f"add_to has shape {add_to.shape}, the conv's output {shape}")
        return add_to
    xp = get_array_module(x)
    return memory.empty(shape, xp.result_type(x, w), xp)


def add_bias(out_c, bias, start, stop):
    """Add ``bias`` (OC,) or per sample (N, OC) to ``out_c``, the chunk ``out[start:stop]``."""
    if bias is not None:
        out_c += bias if bias.ndim == 1 else bias[start:stop, None, None, :]


def few_outputs(C, OC, KH, KW):
    """Whether a KH x KW conv of C -> OC channels takes the per-tap road (:func:`correlate_taps`).

    A 1x1 conv never does: its patch matrix is its input, with no copy at all.
    """
    return KH * KW > 1 and KH * KW * OC <= C


def tap_weights(w):
    """Weight (OC, C, KH, KW) as the (C, KH*KW*OC) matrix of every tap's weights side by side."""
    OC, C, KH, KW = w.shape
    return w.transpose(1, 2, 3, 0).reshape(C, KH * KW * OC)


def correlate_taps(x, w, stride, padding, bias=None, add_to=None):
    """:func:`correlate` for few output channels: ``y = x @ tap_weights(w)`` (one product over
    the pixels, no patch matrix), then ``out[i, j] = sum over taps (a, b) of y_ab at the
    padded position (stride*i + a, stride*j + b)``.
    """
    xp = get_array_module(x)
    N, H, W, C = x.shape
    OC, _, KH, KW = w.shape
    (top, bottom), (left, right) = padding
    OH = (H + top + bottom - KH) // stride + 1
    OW = (W + left + right - KW) // stride + 1
    w_taps = prepared_weight(w, "taps", lambda w: xp.ascontiguousarray(tap_weights(w)))
    out = output_array(x, w, (N, OH, OW, OC), add_to)

    def chunk(start, stop):
        n = stop - start
        y = xp.zeros((n, H + top + bottom, W + left + right, KH, KW, OC), dtype=out.dtype)
        y[:, top:top + H, left:left + W] = matmul(x[start:stop].reshape(-1, C), w_taps).reshape(n, H, W, KH, KW, OC)
        out_c = out[start:stop]
        if add_to is None:
            out_c[...] = 0
        for a in range(KH):
            for b in range(KW):
                out_c += y[:, a:a + stride * OH:stride, b:b + stride * OW:stride, a, b]
        add_bias(out_c, bias, start, stop)

    map_chunks(chunk, N, xp, rows_per_item=H * W)
    return out


def correlate_taps_weight_grad(x, dout, KH, KW, stride, padding):
    """``dw`` of :func:`correlate_taps`: ``x^T @ d``, where ``d`` holds, for each tap (a, b),
    the output gradient at the input positions that tap read (stride*i + a - top, ...)."""
    xp = get_array_module(x)
    N, H, W, C = x.shape
    _, OH, OW, OC = dout.shape
    (top, bottom), (left, right) = padding

    def chunk(start, stop):
        n = stop - start
        d = xp.zeros((n, H + top + bottom, W + left + right, KH, KW, OC), dtype=dout.dtype)
        for a in range(KH):
            for b in range(KW):
                d[:, a:a + stride * OH:stride, b:b + stride * OW:stride, a, b] = dout[start:stop]
        d = d[:, top:top + H, left:left + W].reshape(-1, KH * KW * OC)  # padding reads zeros
        return matmul(x[start:stop].reshape(-1, C).T, d)

    dw = sum(map_chunks(chunk, N, xp, rows_per_item=H * W))
    return dw.reshape(C, KH, KW, OC).transpose(3, 0, 1, 2)


def correlate_im2col(x, w, stride, padding, bias=None, add_to=None):
    """:func:`correlate` as im2col + one product, for any kernel, stride and padding.

    Each chunk of the batch is padded, unfolded and multiplied on its own thread.
    """
    xp = get_array_module(x)
    N, H, W, _ = x.shape
    OC, _, KH, KW = w.shape
    OH = (H + sum(padding[0]) - KH) // stride + 1
    OW = (W + sum(padding[1]) - KW) // stride + 1
    w_matrix = prepared_weight(w, "matrix", lambda w: xp.ascontiguousarray(weight_matrix(w)))
    out = output_array(x, w, (N, OH, OW, OC), add_to)

    def chunk(start, stop):
        cols = columns(x[start:stop], KH, KW, stride, padding)
        out_c = out[start:stop]
        if add_to is None:
            matmul(cols, w_matrix, out=out_c.reshape(-1, OC))
        else:
            products = scratch("conv products", (len(cols), OC), out.dtype) if xp is np else None
            out_c += matmul(cols, w_matrix, out=products).reshape(out_c.shape)
        add_bias(out_c, bias, start, stop)

    map_chunks(chunk, N, xp, rows_per_item=OH * OW)
    return out


def correlate_weight_grad(x, dout, KH, KW, stride):
    """``dw`` (OC, C, KH, KW) of :func:`correlate` from its input and output gradient.

    The sum over the batch is split into chunks: one partial ``dw`` per chunk, added up.
    """
    xp = get_array_module(x)
    N, H, W, C = x.shape
    _, OH, OW, OC = dout.shape
    padding = same_padding(H, KH, stride), same_padding(W, KW, stride)
    if few_outputs(C, OC, KH, KW):
        return correlate_taps_weight_grad(x, dout, KH, KW, stride, padding)
    if winograd_fits(x, KH, KW, stride, padding) and min(C, OC) >= WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS:
        return correlate_3x3_weight_grad(x, dout)

    def chunk(start, stop):
        cols = columns(x[start:stop], KH, KW, stride, padding)
        return matmul(cols.T, dout[start:stop].reshape(-1, OC))

    dw = sum(map_chunks(chunk, N, xp, rows_per_item=OH * OW))
    return dw.reshape(KH, KW, C, OC).transpose(3, 2, 0, 1)


def correlate_input_grad(dout, w, x_shape, stride):
    """``dx`` of shape ``x_shape`` (N, H, W, C) of :func:`correlate` from its output gradient."""
    xp = get_array_module(dout)
    N, H, W, C = x_shape
    OC, _, KH, KW = w.shape
    pad_h, pad_w = same_padding(H, KH, stride), same_padding(W, KW, stride)
    if stride == 1:
        # dx[i, j] = sum_ab dout[i + pad - a, j + pad - b] w[a, b]: a correlation with the
        # flipped kernel, over dout padded by the mirror image of the forward padding.
        flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)  # (C, OC, KH, KW)
        return correlate(dout, flipped, 1, (pad_h[::-1], pad_w[::-1]))
    w_matrix_t = prepared_weight(w, "matrix transposed", lambda w: xp.ascontiguousarray(weight_matrix(w).T))
    padded_shape = (H + sum(pad_h), W + sum(pad_w), C)
    dtype = xp.result_type(dout, w)
    dx = memory.empty(x_shape, dtype, xp)
    in_rows = dout.shape[1] * dout.shape[2]

    def work_array(name, shape):
        return scratch(name, shape, dtype) if xp is np else xp.empty(shape, dtype=dtype)

    def chunk(start, stop):
        n = stop - start
        dcols = work_array("col2im columns", (n * in_rows, KH * KW * C))
        matmul(dout[start:stop].reshape(-1, OC), w_matrix_t, out=dcols)
        dxpad = col2im(dcols, (n, *padded_shape), KH, KW, stride, out=work_array("col2im image", (n, *padded_shape)))
        dx[start:stop] = dxpad[:, pad_h[0]:pad_h[0] + H, pad_w[0]:pad_w[0] + W]

    # dcols is KH*KW times wider than dout: a quarter of the usual rows keeps a chunk's in cache
    map_chunks(chunk, N, xp, rows_per_item=in_rows, chunk_rows=CHUNK_ROWS // 4)
    return dx


def bias_grad(dout):
    """The gradient of a bias added along the last axis: ``dout`` summed over all other axes.

    On CuPy this is one matrix-vector product (``fused.sum_rows``), as the column sums of a
    tall matrix leave most of the GPU idle in CuPy's reduction.
    """
    dout2d = dout.reshape(-1, dout.shape[-1])
    return dout2d.sum(axis=0) if get_array_module(dout) is np else fused.sum_rows(dout2d)


def pixel_sums(a):
    """``a`` (N, ..., C) summed over its pixels per sample and channel: (N, C), the gradient of a
    per-sample bias. A product with a vector of ones: on NumPy, BLAS reads the pixels 4x
    faster than ``sum(axis=1)`` walks them. On CuPy the ones are a (1, L) row repeated over
    the samples, a stack of matrix products that a captured graph's cuBLAS takes too."""
    xp = get_array_module(a)
    N, C = len(a), a.shape[-1]
    a3 = a.reshape(N, -1, C)
    if xp is np:
        return xp.matmul(xp.ones(a3.shape[1], dtype=a.dtype), a3)
    ones = xp.broadcast_to(xp.ones((1, a3.shape[1]), dtype=a.dtype), (N, 1, a3.shape[1]))
    return matmul(ones, a3).reshape(N, C)


def conv2d_forward(x, w, b, stride=1, add_to=None):
    """Conv ``x`` (N, H, W, C) with ``w`` (OC, C, KH, KW) and bias ``b``: (OC,), or one per sample (N, OC).

    Returns ``(out, cache)`` with ``out`` (N, OH, OW, OC), or ``add_to`` with the conv added in.
    """
    return correlate(x, w, stride, bias=b, add_to=add_to), (x, w, stride, b.ndim == 2)


def conv2d_backward(dout, cache, needs_input_grad=True):
    """Gradients ``(dx, dw, db)`` of :func:`conv2d_forward`, ``db`` shaped as its bias was;
    ``dx`` is None if not needed."""
    x, w, stride, per_sample_bias = cache
    _, _, KH, KW = w.shape
    db = pixel_sums(dout) if per_sample_bias else bias_grad(dout)
    dw = correlate_weight_grad(x, dout, KH, KW, stride)
    dx = correlate_input_grad(dout, w, x.shape, stride) if needs_input_grad else None
    return dx, dw, db


def glorot_uniform(rng, shape, fan_in, fan_out, dtype):
    """Glorot (Xavier) uniform initialisation, MATLAB's default for weights."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


class Conv2d(Module):
    """2-D convolution with MATLAB "same" padding on channels-last images.

    Shapes: x (N, H, W, C) -> out (N, ceil(H/stride), ceil(W/stride), OC);
    weight (OC, C, KH, KW), bias (OC,).

    Two options spare a residual block a pass over its activations each:
    ``forward(x, shift)`` adds a per-sample vector ``shift`` (N, OC) to every pixel along
    with the bias (the time embedding), and backward then returns ``(dx, dshift)``;
    ``forward(x, add_to=r)`` adds the conv into ``r`` (N, OH, OW, OC) and returns it (a
    residual sum; ``r``'s gradient is the caller's ``dout``).

    Set ``needs_input_grad = False`` on a conv that reads the network input:
    its backward then skips the input gradient and returns None.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, rng=None, dtype=np.float32):
        rng = np.random.default_rng() if rng is None else rng
        KH = KW = kernel_size
        self.stride = stride
        self.needs_input_grad = True
        self.weight = Parameter(glorot_uniform(
            rng, (out_channels, in_channels, KH, KW),
            fan_in=in_channels * KH * KW, fan_out=out_channels * KH * KW, dtype=dtype))
        self.bias = Parameter(np.zeros(out_channels, dtype=dtype))

    def forward(self, x, shift=None, add_to=None):
        bias = self.bias.data if shift is None else self.bias.data + shift
        out, cache = conv2d_forward(x, self.weight.data, bias, self.stride, add_to)
        self.save_for_backward(cache)
        return out

    def backward(self, dout):
        (cache,) = self.saved()
        dx, dw, db = conv2d_backward(dout, cache, self.needs_input_grad)
        self.weight.grad += dw
        if db.ndim == 2:  # forward had a shift: db is per sample, and is the shift's gradient
            self.bias.grad += db.sum(axis=0)
            return dx, db
        self.bias.grad += db
        return dx
