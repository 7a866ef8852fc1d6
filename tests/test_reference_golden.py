"""The PyTorch reference (bench/torch_reference.py) against the independent float64 golden
forward pass in shared/golden/.

The reference is what tinyddpm's NumPy port is checked against, so it must itself reproduce
the golden numbers: the output and every block's intermediate to a relative error of 1e-10
(a correct float64 implementation lands near 1e-14; wiring mistakes give O(1)).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench.torch_reference import (  # noqa: E402  (after importorskip on purpose)
    ReferenceUNet,
    golden_state,
    load_numpy_state,
    seeded_state,
)

REL_TOL = 1e-10


def _golden_dir() -> Path:
    # CI clones the repo next to shared/; TINYDDPM_SHARED points at another shared/ checkout.
    env = os.environ.get("TINYDDPM_SHARED")
    shared = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"
    return shared / "golden"


GOLDEN = _golden_dir()
pytestmark = pytest.mark.skipif(
    not (GOLDEN / "example_net_params.json").is_file()
    or not (GOLDEN / "example_net_forward.npz").is_file(),
    reason=f"golden files not found in {GOLDEN} (clone shared/ next to the repo or set "
    "TINYDDPM_SHARED to the shared/ directory)",
)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def golden_json() -> dict:
    with open(GOLDEN / "example_net_params.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def golden_npz() -> dict:
    with np.load(GOLDEN / "example_net_forward.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def golden_weights() -> dict:
    return golden_state(GOLDEN)


@pytest.fixture(scope="module")
def reference_acts(golden_npz, golden_weights) -> dict:
    model = load_numpy_state(ReferenceUNet(), golden_weights).eval()
    assert next(model.parameters()).dtype == torch.float64
    x = torch.from_numpy(golden_npz["x"])
    t = torch.from_numpy(golden_npz["t"])
    assert x.dtype == torch.float64
    with torch.no_grad():
        acts = model(x, t, return_intermediates=True)
    return {k: v.numpy() for k, v in acts.items()}


def test_parameter_names_shapes_and_count(golden_json):
    sd = ReferenceUNet().state_dict()
    names = [p["name"] for p in golden_json["params"]]
    assert list(sd) == names  # same names, same order
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        p["name"]: tuple(p["shape"]) for p in golden_json["params"]
    }
    assert len(sd) == 274 == golden_json["arrays"]
    assert sum(v.numel() for v in sd.values()) == 12_980_033 == golden_json["count"]


def test_seed_rule_helper_matches_golden_weights(golden_weights):
    # seeded_state (used for reduced-width copies) must be the README rule for the full net.
    model_state = seeded_state(ReferenceUNet())
    assert list(model_state) == list(golden_weights)
    for k, v in golden_weights.items():
        assert v.dtype == np.float64
        np.testing.assert_array_equal(model_state[k], v, err_msg=k)


def test_intermediate_keys_cover_golden(golden_npz, reference_acts):
    expected = set(golden_npz) - {"x", "t"}
    assert set(reference_acts) == expected


# Listed in forward order so a failure report reads top-down to the first diverging block.
ACT_KEYS = (
    ["act_sinusoid", "act_time_embedding", "act_conv_in", "act_r1", "act_r2", "act_r3", "act_a3",
     "act_r4", "act_a4", "act_r5", "act_r6", "act_r7", "act_a7", "act_r8", "act_a8", "act_r9",
     "act_r10", "act_r11", "act_a11", "act_r12", "act_a12", "act_r13", "act_r14", "out"]
)


@pytest.mark.parametrize("key", ACT_KEYS)
def test_matches_golden(key, golden_npz, reference_acts):
    got, want = reference_acts[key], golden_npz[key]
    assert got.dtype == np.float64
    assert got.shape == want.shape
    err = rel_err(got, want)
    assert err <= REL_TOL, f"{key}: relative error {err:.3e} > {REL_TOL:g}"


def test_reduced_width_copy_float32(golden_json):
    # Same topology at small widths; float32 weights must stay float32 after loading.
    model = ReferenceUNet(widths=(8, 16, 32), groups=4, emb_dim=32, sinusoid_dim=16)
    assert list(model.state_dict()) == [p["name"] for p in golden_json["params"]]
    state = {k: v.astype(np.float32) for k, v in seeded_state(model).items()}
    load_numpy_state(model, state)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.zeros(2, 1, 32, 32)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 500]))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
