"""The NumPy forward of the transposed conv, phase by phase, against its definition and
against the conv's input gradient (the GPU's road), in float64."""

import numpy as np
import pytest

from tinyddpm.nn import parallel
from tinyddpm.nn.conv import correlate_input_grad
from tinyddpm.nn.conv_transpose import conv_transpose2d_forward


def scattered(x, w, b):
    """Every input pixel's 3x3 stamp added into a (2H+1) x (2W+1) grid, cropped to 2H x 2W."""
    N, H, W, _ = x.shape
    grid = np.zeros((N, 2 * H + 1, 2 * W + 1, w.shape[1]))
    for i, j, a, c in np.ndindex(H, W, 3, 3):
        grid[:, 2 * i + a, 2 * j + c] += x[:, i, j] @ w[:, :, a, c]
    return grid[:, :2 * H, :2 * W] + b


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 3, 5, 4), (3, 4, 1, 2), (2, 7, 6, 5)])
@pytest.mark.parametrize("threads", [1, 3])
def test_phases_match_the_stamps_and_the_conv_input_gradient(monkeypatch, shape, threads):
    monkeypatch.setattr(parallel, "THREADS", threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    w, b = rng.standard_normal((shape[-1], 6, 3, 3)), rng.standard_normal(6)
    out, _ = conv_transpose2d_forward(x, w, b)
    N, H, W, _ = shape
    np.testing.assert_allclose(out, scattered(x, w, b), rtol=0, atol=1e-12)
    np.testing.assert_allclose(out, correlate_input_grad(x, w, (N, 2 * H, 2 * W, 6), 2) + b, rtol=0, atol=1e-12)
