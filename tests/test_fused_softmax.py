"""The GPU's one-kernel softmax (fused.softmax_rows) against NumPy's, row lengths below, at and
above a warp's 32, scores large enough that a softmax without the row max would overflow."""

import numpy as np
import pytest

from tinyddpm.backend import array_module, gpu_unavailable_reason
from tinyddpm.nn.attention import softmax

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(gpu_unavailable_reason() is not None, reason=f"gpu: {gpu_unavailable_reason()}")]


@pytest.mark.parametrize("shape", [(3, 2, 37, 37), (2, 1, 256, 256), (5, 7), (4, 1)])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-13), (np.float32, 1e-5)])
def test_softmax_rows_is_numpys_softmax(shape, dtype, rtol):
    cupy = array_module("gpu")
    scores = (np.random.default_rng(2).standard_normal(shape) * 200).astype(dtype)
    expected = softmax(scores.copy())
    got = softmax(cupy.asarray(scores))
    np.testing.assert_allclose(cupy.asnumpy(got), expected, rtol=rtol, atol=rtol * 1e-3)
    np.testing.assert_allclose(cupy.asnumpy(got).sum(axis=-1), 1.0, rtol=rtol)


def test_softmax_rows_refuses_a_strided_array():
    cupy = array_module("gpu")
    with pytest.raises(ValueError, match="contiguous"):
        softmax(cupy.zeros((4, 6))[:, ::2])
