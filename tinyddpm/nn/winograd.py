"""3x3 stride-1 "same" correlation and its weight gradient by Winograd's F(2x2, 3x3), on NumPy.

Shapes: input ``x`` (N, H, W, C) with H and W even, zero-padded by one pixel on
every side; weight ``w`` (OC, C, 3, 3); output and output gradient (N, H, W, OC).

The output is cut into 2x2 tiles. Tile (p, q) comes from the 4x4 input tile
``d`` at rows 2p..2p+3, columns 2q..2q+3 of the padded input, and a 3x3 kernel
``g``, as (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016)::

    y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise over a 4x4 grid)

    B^T = [1  0 -1  0]     G = [ 1    0    0 ]     A^T = [1  1  1  0]
          [0  1  1  0]         [1/2  1/2  1/2]           [0  1 -1 -1]
          [0 -1  1  0]         [1/2 -1/2  1/2]
          [0  1  0 -1]         [ 0    0    1 ]

Summed over input channels, the elementwise product becomes 16 matrix products,
one per grid point (k, l): ``M[k, l] = V[k, l] @ U[k, l]``, with ``V[k, l]``
(tiles, C) the transformed input and ``U[k, l]`` (C, OC) the transformed filter.
A 2x2 output tile then costs 16 multiplications per channel pair instead of
im2col's 4 * 9 = 36, and the 16 products are ordinary GEMMs.

The weight gradient is the same identity read backwards: ``dU[k, l] =
V[k, l]^T @ DY[k, l]`` with ``DY = A dy A^T`` the transformed output gradient
of each tile, summed over the tiles by the product itself, and then
``dg = G^T dU G``.

The filter transforms happen once per call (once per sampling run: see
``module.frozen_weights``). The rest runs chunk by chunk over the batch on all
cores (``parallel.py``), as in-place ufuncs with no Python loop over pixels, in
the thread's scratch arrays (``parallel.scratch``), which the next chunk reuses.

Every transform is separable, and the input's is applied to the tile columns
first, then to the tile rows, one grid column l at a time, so that only one
column of V and of M exists at once. The layout is chosen so that every array a
transform reads or writes is one contiguous block. NumPy runs a ufunc whose
operands are not contiguous through small buffers, copied in and out: the input
transform of a chunk of 32x32 or 16x16 images took 3.4-5.2 ns per input number
on strided views, and takes 2.0-2.5 ns on blocks, which cost one extra copy of
the input (:func:`padded_input_columns`). The products of each grid column go
straight into ``A^T M``, and ``(A^T M) A`` is written into the output's 2x2
tile positions as four stride-2 views; the weight gradient returns one partial
``dU`` per chunk.

The entries of B, G and A are 0, +-1 and +-1/2, so the transforms only add
the rounding of a few additions: in float64 the results equal im2col's to
about 1e-15, and in float32 they are about as accurate as im2col's.
"""

import numpy as np

from tinyddpm.nn import memory
from tinyddpm.nn.module import prepared_weight
from tinyddpm.nn.parallel import map_chunks, one_blas_thread, scratch

# Pixels per chunk. A chunk holds about (5 C + 3 OC) numbers per pixel (the gathered input
# columns, their transform, one grid column of V, and three arrays of the output's size), a few MB.
CHUNK_PIXELS = 2048

G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
# U[k, l] = sum_ab G[k, a] g[a, b] G[l, b]: row 4k + l of G (x) G maps the 9 taps g[a, b]
# (row-major) to the grid point (k, l), and its transpose maps dU back onto the taps.
TAPS_TO_POINTS = np.kron(G, G)  # (16, 9)


def filter_transform(w, dtype):
    """``U = G g G^T`` of every channel pair of ``w`` (OC, C, 3, 3): (4, 4, C, OC) in ``dtype``."""
    OC, C = w.shape[:2]
    taps = w.transpose(2, 3, 1, 0).reshape(9, C * OC).astype(dtype, copy=False)
    with one_blas_thread():
        return (TAPS_TO_POINTS.astype(dtype) @ taps).reshape(4, 4, C, OC)


def input_transform(d, out):
    """``out[k] = sum_i B^T[k, i] d[i]`` for four equal-shaped arrays ``d``, into ``out[0..3]``."""
    d0, d1, d2, d3 = d
    np.subtract(d0, d2, out=out[0])
    np.add(d1, d2, out=out[1])
    np.subtract(d2, d1, out=out[2])
    np.subtract(d1, d3, out=out[3])


def output_transform(m, out0, out1, accumulate=False):
    """``out_i = sum_k A^T[i, k] m[k]`` (or ``+=`` with ``accumulate``) for four equal-shaped
    arrays ``m``, which it overwrites."""
    m0, m1, m2, m3 = m
    m0 += m1
    m1 -= m2
    if accumulate:
        m0 += m2
        out0 += m0
        m1 -= m3
        out1 += m1
    else:
        np.add(m0, m2, out=out0)
        np.subtract(m1, m3, out=out1)


def gradient_transform(e, out):
    """``out[k] = sum_i A[k, i] e[i]`` for two equal-shaped arrays ``e``, into ``out[0..3]``."""
    e0, e1 = e
    np.copyto(out[0], e0)
    np.add(e0, e1, out=out[1])
    np.subtract(e0, e1, out=out[2])
    np.negative(e1, out=out[3])


def padded_input_columns(x, dtype):
    """The columns of every tile, gathered from ``x`` (n, H, W, C) zero-padded by 1.

    Returns (4, 2, H/2 + 1, n, W/2, C): ``[j, a, r, :, q]`` is padded row 2r + a and padded
    column 2q + j, the column j of tile column q. Tile row p reads padded rows 2p + i, which
    is ``[:, i % 2, p + i // 2]``. So each array that a transform reads, a ``[j]`` or a
    ``[..., a, b:b + H/2]``, is one contiguous block, and tiles come in the order (p, n, q).
    """
    n, H, W, C = x.shape
    cols = scratch("winograd input columns", (4, 2, H // 2 + 1, n, W // 2, C), dtype)
    cols[:, 0, 0] = 0  # padded row 0
    cols[:, 1, -1] = 0  # padded row H + 1
    cols[0, :, :, :, 0] = 0  # padded column 0
    cols[3, :, :, :, -1] = 0  # padded column W + 1
    # Padded row 2r + a is image row 2r + a - 1, and padded column 2q + j image column 2q + j - 1.
    for a, (r, image_rows) in enumerate([(slice(1, None), slice(1, None, 2)), (slice(0, -1), slice(0, None, 2))]):
        rows = x[:, image_rows].transpose(1, 0, 2, 3)  # (H/2, n, W, C)
        cols[0, a, r, :, 1:] = rows[:, :, 1:-2:2]
        cols[1, a, r] = rows[:, :, 0::2]
        cols[2, a, r] = rows[:, :, 1::2]
        cols[3, a, r, :, :-1] = rows[:, :, 2::2]
    return cols


def transformed_columns(x, dtype):
    """``d B``, the column half of the input transform, of every tile of ``x`` (n, H, W, C) padded
    by 1: (4, 2, H/2 + 1, n, W/2, C), grid column l first, laid out as :func:`padded_input_columns`."""
    cols = padded_input_columns(x, dtype)
    columns = scratch("winograd column transform", cols.shape, dtype)
    input_transform(cols, columns)
    return columns


def tile_rows(columns_l):
    """The four input rows of every tile, from one column ``columns_l`` (2, H/2 + 1, n, W/2, C)."""
    P = columns_l.shape[1] - 1
    return [columns_l[i % 2, i // 2:i // 2 + P] for i in range(4)]


def correlate_3x3(x, w, out=None, accumulate=False, bias=None):
    """``x`` (N, H, W, C) zero-padded by 1, correlated with ``w`` (OC, C, 3, 3): (N, H, W, OC).

    The result goes into ``out`` if given (added to its values with ``accumulate``). A
    ``bias``, one vector (OC,) or one per sample (N, OC), is added to every pixel: to the
    products of grid point (1, 1) only, since column 1 of A^T is (1, 1), so ``A^T E A``
    carries a bias ``E`` at that point to all four pixels of the tile. That is a pass over
    a quarter of the output instead of over all of it.
    """
    N, H, W, C = x.shape
    OC = w.shape[0]
    dtype = np.result_type(x, w)
    u = prepared_weight(w, ("winograd", dtype), lambda w: filter_transform(w, dtype))
    if out is None:
        out = memory.empty((N, H, W, OC), dtype)

    def chunk(start, stop):
        tiles = (H // 2, stop - start, W // 2)  # in the order (p, n, q)
        columns = transformed_columns(x[start:stop], dtype)
        v = scratch("winograd V", (4, *tiles, C), dtype)
        m = scratch("winograd M", (4, np.prod(tiles), OC), dtype)
        t = scratch("winograd A^T M", (2, 4, *tiles, OC), dtype)
        for grid_col in range(4):
            input_transform(tile_rows(columns[grid_col]), v)  # V[0..3, grid_col]
            np.matmul(v.reshape(4, -1, C), u[:, grid_col], out=m)  # M[0..3, grid_col]
            if grid_col == 1 and bias is not None:
                m11 = m[1].reshape(*tiles[:2], -1, OC)
                m11 += bias if bias.ndim == 1 else bias[start:stop, None, :]
            output_transform(m.reshape(4, *tiles, OC), t[0, grid_col], t[1, grid_col])  # A^T M[:, grid_col]

        # (A^T M) A: the columns of the grid, written into the output's 2x2 tile positions.
        tile_out = out[start:stop].transpose(1, 0, 2, 3)  # (H, n, W, OC), to match the tiles' order
        for i in range(2):
            output_transform(t[i], tile_out[i::2, :, 0::2], tile_out[i::2, :, 1::2], accumulate)

    map_chunks(chunk, N, np, rows_per_item=H * W, chunk_rows=CHUNK_PIXELS)
    return out


def correlate_3x3_weight_grad(x, dout):
    """``dw`` (OC, C, 3, 3) of :func:`correlate_3x3` from its input ``x`` and output gradient ``dout``.

    Each chunk returns its partial ``dU[k, l] = V[k, l]^T @ DY[k, l]`` (4, 4, C, OC);
    their sum is mapped back onto the taps, ``dg = G^T dU G``.
    """
    N, H, W, C = x.shape
    OC = dout.shape[3]
    dtype = np.result_type(x, dout)

    def chunk(start, stop):
        tiles = (H // 2, stop - start, W // 2)  # in the order (p, n, q)
        columns = transformed_columns(x[start:stop], dtype)
        # dy A^T, the column half of A dy A^T, of each tile's rows 2p + a:
        # grad_columns[l, a, p, :, q] = sum over j of A[l, j] dy[:, 2p + a, 2q + j].
        grad_columns = scratch("winograd gradient columns", (4, 2, *tiles, OC), dtype)
        grad_rows = dout[start:stop].transpose(1, 0, 2, 3)  # (H, n, W, OC)
        for a in range(2):
            gradient_transform([grad_rows[a::2, :, j::2] for j in range(2)], grad_columns[:, a])
        v = scratch("winograd V", (4, *tiles, C), dtype)
        dy = scratch("winograd DY", (4, *tiles, OC), dtype)
        du = np.empty((4, 4, C, OC), dtype=dtype)
        for grid_col in range(4):
            input_transform(tile_rows(columns[grid_col]), v)  # V[0..3, grid_col]
            gradient_transform(grad_columns[grid_col], dy)  # DY[0..3, grid_col]
            np.matmul(v.reshape(4, -1, C).transpose(0, 2, 1), dy.reshape(4, -1, OC), out=du[:, grid_col])
        return du

    du = sum(map_chunks(chunk, N, np, rows_per_item=H * W, chunk_rows=CHUNK_PIXELS))
    with one_blas_thread():
        taps = TAPS_TO_POINTS.T.astype(dtype) @ du.reshape(16, C * OC)
    return taps.reshape(3, 3, C, OC).transpose(3, 2, 0, 1)
