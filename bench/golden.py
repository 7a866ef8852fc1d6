"""The golden weights of ``shared/golden`` (NumPy only, so tests of tinyddpm need no torch).

The rule (``shared/golden/README.md``): array k gets ``z = default_rng(seed_k).standard_normal(shape)``;
GroupNorm gamma ``1 + 0.1 z``, every bias ``0.1 z``, conv and linear weights ``z / sqrt(fan_in)``.
"""

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np


def seeded_array(name: str, shape: Sequence[int], seed: int, transposed: bool) -> np.ndarray:
    """One array by the golden README's seed rule (float64)."""
    z = np.random.default_rng(seed).standard_normal(tuple(shape))
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return 0.1 * z  # GN beta and every other bias alike
    if "norm" in name:  # GroupNorm gamma
        return 1.0 + 0.1 * z
    # Conv / linear weight: z / sqrt(fan_in). Conv (out, in, kh, kw) and linear (out, in) have
    # fan_in = shape[1] * kh * kw; the transposed conv's (in, out, kh, kw) has it on axis 0.
    rf = int(np.prod(shape[2:], dtype=np.int64))  # 1 for a linear weight
    fan_in = (shape[0] if transposed else shape[1]) * rf
    return z / np.sqrt(fan_in)


def default_golden_dir() -> Path:
    """``$TINYDDPM_SHARED/golden`` if that variable is set, else ``<repo>/../shared/golden``
    (CI clones the repo next to ``shared/``)."""
    env = os.environ.get("TINYDDPM_SHARED")
    shared = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"
    return shared / "golden"


def golden_params(golden_dir: str | Path | None = None) -> dict:
    """The parsed ``example_net_params.json``."""
    d = Path(golden_dir) if golden_dir is not None else default_golden_dir()
    with open(d / "example_net_params.json") as f:
        return json.load(f)


def golden_state(golden_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """The golden weights (float64 numpy, golden order), generated from the names, shapes and
    seeds in ``example_net_params.json`` by the README's rule."""
    spec = golden_params(golden_dir)
    return {
        p["name"]: seeded_array(p["name"], p["shape"], p["seed"],
                                 p["layout"].startswith("(in, out"))
        for p in spec["params"]
    }




def seeded_named_state(shapes, transposed, base_seed=1000):
    """The rule applied to any network: ``shapes`` is an ordered ``{name: shape}``; the k-th
    array gets seed ``base_seed + k``; ``transposed`` names the transposed-conv weights."""
    return {name: seeded_array(name, shape, base_seed + k, name in transposed)
            for k, (name, shape) in enumerate(shapes.items())}


def golden_forward(golden_dir=None):
    """The golden inputs, output and intermediates as a dict of float64 arrays."""
    d = Path(golden_dir) if golden_dir is not None else default_golden_dir()
    with np.load(d / "example_net_forward.npz") as f:
        return dict(f)
