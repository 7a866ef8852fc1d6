"""The layouts cublas.CaptureBlas hands to cuBLAS, checked on the CPU: the column-major
products it asks for are carried out with NumPy on the same memory, and must equal a @ b."""

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from tinyddpm.nn.cublas import OP_N, CaptureBlas


class NumpyGemm(CaptureBlas):
    """CaptureBlas whose gemm reads and writes host memory the way cuBLAS reads device memory."""

    def __init__(self):
        self.calls = []

    def _gemm(self, dtype, op_x, op_y, m, n, k, x, y, z, batch):
        self.calls.append((op_x, op_y, batch))

        def column_major(array, op, ld, stride, rows, cols):
            shape, strides = ((rows, cols), (1, ld)) if op == OP_N else ((rows, cols), (ld, 1))
            return as_strided(array, (batch, *shape), [s * array.itemsize for s in (stride, *strides)])

        (x, ld_x, stride_x), (y, ld_y, stride_y), (z, ld_z, stride_z) = x, y, z
        product = column_major(x, op_x, ld_x, stride_x, m, k) @ column_major(y, op_y, ld_y, stride_y, k, n)
        column_major(z, OP_N, ld_z, stride_z, m, n)[...] = product


rng = np.random.default_rng(0)


def matrices(*shape):
    return rng.standard_normal(shape)


CASES = {
    "contiguous": lambda: (matrices(5, 3), matrices(3, 4)),
    "transposed right (Linear's w.T)": lambda: (matrices(5, 3), matrices(4, 3).T),
    "transposed left": lambda: (matrices(3, 5).T, matrices(3, 4)),
    "both transposed": lambda: (matrices(3, 5).T, matrices(4, 3).T),
    "row slices (a conv chunk)": lambda: (matrices(9, 3)[2:7], matrices(3, 4)),
    "column slice": lambda: (matrices(5, 6)[:, 1:4], matrices(3, 4)),
    "one row": lambda: (matrices(1, 3), matrices(4, 3).T),
    "one column": lambda: (matrices(5, 3), matrices(1, 3).T),
    "stack, one head (attention)": lambda: (matrices(2, 1, 6, 4), matrices(2, 6, 1, 4).transpose(0, 2, 3, 1)),
    "stack, three heads (copied)": lambda: (matrices(2, 3, 6, 4), matrices(2, 6, 3, 4).transpose(0, 2, 3, 1)),
    "stack of strided views": lambda: (matrices(4, 6, 5)[::2], matrices(2, 5, 3)),
    "reversed rows (copied)": lambda: (matrices(5, 3)[::-1], matrices(3, 4)),
    "reversed stack (copied)": lambda: (matrices(3, 5, 3)[::-1], matrices(3, 3, 4)),
}


@pytest.mark.parametrize("case", CASES)
def test_the_products_it_asks_for_are_a_at_b(case):
    a, b = CASES[case]()
    blas = NumpyGemm()
    np.testing.assert_allclose(blas.matmul(a, b), a @ b, rtol=1e-12, atol=1e-12)
    assert len(blas.calls) == 1


def test_it_writes_into_out_even_where_cublas_cannot():
    a, b = matrices(5, 3), matrices(3, 4)
    blas = NumpyGemm()
    out = np.zeros((5, 4))
    assert blas.matmul(a, b, out=out) is out
    np.testing.assert_allclose(out, a @ b, rtol=1e-12)
    out_t = np.zeros((4, 5)).T  # column-major: the product goes through a temporary
    assert blas.matmul(a, b, out=out_t) is out_t
    np.testing.assert_allclose(out_t, a @ b, rtol=1e-12)


def test_empty_products_and_bad_shapes():
    blas = NumpyGemm()
    assert blas.matmul(matrices(0, 3), matrices(3, 4)).shape == (0, 4)
    assert blas.calls == []
    with pytest.raises(ValueError, match="cannot multiply"):
        blas.matmul(matrices(5, 3), matrices(4, 4))
    with pytest.raises(TypeError, match="float32 or two float64"):
        blas.matmul(matrices(5, 3).astype(np.float32), matrices(3, 4))


def test_only_device_products_go_to_the_capture_handle():
    from tinyddpm.nn.matmul import matmul, products_through

    blas = NumpyGemm()
    a, b = matrices(5, 3), matrices(3, 4)
    with products_through(blas):
        np.testing.assert_allclose(matmul(a, b), a @ b, rtol=1e-12)  # NumPy arrays: NumPy's matmul
    assert blas.calls == []
