"""Every layer, and a small U-Net made of them, against finite differences (tinyddpm.gradcheck)."""

import os
from pathlib import Path

import numpy as np
import pytest

from tinyddpm.backend import to_device, to_host
from tinyddpm.gradcheck import (
    BOUND,
    check_module,
    format_table,
    run_checks,
    standard_checks,
)
from tinyddpm.nn import Conv2d, Linear, SinusoidalEmbedding

CASE_NAMES = [case.name for case in standard_checks(np, np.random.default_rng(0))]


def find_case(xp, name, seed=0):
    rng = np.random.default_rng(seed)
    return next(case for case in standard_checks(xp, rng) if case.name == name), rng


@pytest.mark.parametrize("name", CASE_NAMES)
def test_backward_matches_finite_differences(xp, name):
    case, rng = find_case(xp, name)
    rows = check_module(case.module, case.inputs, rng, wrt=case.wrt)
    failed = [row for row in rows if not row.error < BOUND]
    assert not failed, f"{name}: {failed}"


def test_checker_names_a_broken_input_gradient(monkeypatch):
    """1e-3 of noise added to Linear's dx must fail the 'x' row and the joint row, nothing else."""
    correct = Linear.backward

    def broken(self, dout):
        dx = correct(self, dout)
        return dx + 1e-3 * np.random.default_rng(1).standard_normal(dx.shape)

    monkeypatch.setattr(Linear, "backward", broken)
    case, rng = find_case(np, "linear")
    errors = {row.name: row.error for row in check_module(case.module, case.inputs, rng)}
    assert errors["all"] > BOUND and errors["x"] > BOUND
    assert errors["weight"] < BOUND and errors["bias"] < BOUND


def test_checker_names_a_broken_parameter_gradient(monkeypatch):
    """1e-3 of noise added to a conv's weight gradient must fail the 'weight' row."""
    correct = Conv2d.backward

    def broken(self, dout):
        dx = correct(self, dout)
        self.weight.grad += 1e-3 * np.random.default_rng(1).standard_normal(self.weight.grad.shape)
        return dx

    monkeypatch.setattr(Conv2d, "backward", broken)
    case, rng = find_case(np, "conv 3x3 stride 2")
    errors = {row.name: row.error for row in check_module(case.module, case.inputs, rng)}
    assert errors["all"] > BOUND and errors["weight"] > BOUND
    assert errors["x"] < BOUND and errors["bias"] < BOUND


def test_run_checks_and_table():
    rows = run_checks(np)
    assert {row.case for row in rows} == set(CASE_NAMES)
    assert all(row.passed for row in rows)
    table = format_table(rows)
    assert f"{len(rows)} of {len(rows)} checks passed" in table
    assert "tiny u-net" in table and "attn.k.bias" in table


def golden_dir():
    """``$TINYDDPM_SHARED/golden``, else ``shared/golden`` next to the repository."""
    shared = os.environ.get("TINYDDPM_SHARED") or Path(__file__).resolve().parents[2] / "shared"
    return Path(shared) / "golden"


def test_sinusoidal_embedding_matches_golden(xp):
    path = golden_dir() / "example_net_forward.npz"
    if not path.is_file():
        pytest.skip(f"golden file not found: {path}")
    golden = np.load(path)
    embedding = SinusoidalEmbedding(64, dtype=np.float64)
    out = to_host(embedding(to_device(golden["t"], xp)))
    np.testing.assert_allclose(out, golden["act_sinusoid"], rtol=0, atol=1e-12)
    assert embedding.backward(None) is None


def test_sinusoidal_embedding_dtype_and_layout(xp):
    out = to_host(SinusoidalEmbedding(8)(xp.asarray([0, 3])))
    assert out.dtype == np.float32 and out.shape == (2, 8)
    np.testing.assert_array_equal(out[0], [0, 1, 0, 1, 0, 1, 0, 1])  # sin 0, cos 0 interleaved
    np.testing.assert_allclose(out[1, :2], [np.sin(3), np.cos(3)], rtol=1e-6)
