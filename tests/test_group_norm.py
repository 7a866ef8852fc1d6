"""GroupNorm's NumPy forward, which works on rows of several pixels, against the definition
in float64, for shapes whose rows hold one pixel, several, or all of an image's; and on the
GPU, the forward without grad (one kernel after the statistics) against the one with grad."""

import numpy as np
import pytest

from tinyddpm.backend import array_module, gpu_unavailable_reason
from tinyddpm.nn import no_grad
from tinyddpm.nn.group_norm import ROW_NUMBERS, group_norm_forward, group_norm_swish_forward


def group_normalised(x, gamma, beta, G, eps=1e-5):
    N, C = x.shape[0], x.shape[-1]
    groups = x.reshape(N, -1, G, C // G)
    mean = groups.mean(axis=(1, 3), keepdims=True)
    variance = groups.var(axis=(1, 3), keepdims=True)
    return ((groups - mean) / np.sqrt(variance + eps)).reshape(x.shape) * gamma + beta


@pytest.mark.parametrize("shape, G", [((2, 4, 4, 64), 32), ((3, 7, 1, 12), 3), ((2, 2, 3, 2 * ROW_NUMBERS), 4),
                                      ((2, 5, 3, ROW_NUMBERS // 2), 8), ((4, 96), 8)])
def test_forward_matches_the_definition(shape, G):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 3 + rng.standard_normal(shape[-1])  # a mean per channel
    gamma, beta = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    expected = group_normalised(x, gamma, beta, G)
    out, _ = group_norm_forward(x, gamma, beta, G)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    swish, normalised, _ = group_norm_swish_forward(x, gamma, beta, G, keep_normalised=True)
    np.testing.assert_allclose(normalised, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(swish, expected / (1 + np.exp(-expected)), rtol=0, atol=1e-12)
    swish_only, _, _ = group_norm_swish_forward(x, gamma, beta, G)
    np.testing.assert_allclose(swish_only, swish, rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_unavailable_reason() is not None, reason=f"gpu: {gpu_unavailable_reason()}")
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-14), (np.float32, 1e-6)])
def test_the_gpu_forward_without_grad_is_the_one_with_grad(dtype, rtol):
    cupy = array_module("gpu")
    rng = np.random.default_rng(1)
    x = cupy.asarray((rng.standard_normal((3, 8, 8, 64)) * 2 + 1).astype(dtype))
    gamma, beta = (cupy.asarray(rng.standard_normal(64).astype(dtype)) for _ in range(2))
    with_grad = [group_norm_forward(x, gamma, beta, 32)[0],
                 *group_norm_swish_forward(x, gamma, beta, 32, keep_normalised=True)[:2],
                 group_norm_swish_forward(x, gamma, beta, 32)[0]]
    with no_grad():
        out, cache = group_norm_forward(x, gamma, beta, 32)
        assert cache is None
        swish, normalised, cache = group_norm_swish_forward(x, gamma, beta, 32, keep_normalised=True)
        assert cache is None
        swish_only, none, cache = group_norm_swish_forward(x, gamma, beta, 32)
        assert none is None and cache is None
    for got, expected in zip((out, swish, normalised, swish_only), with_grad):
        np.testing.assert_allclose(cupy.asnumpy(got), cupy.asnumpy(expected), rtol=rtol, atol=rtol)
