"""GroupNorm's NumPy forward, which works on rows of several pixels, against the definition
in float64, for shapes whose rows hold one pixel, several, or all of an image's."""

import numpy as np
import pytest

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
