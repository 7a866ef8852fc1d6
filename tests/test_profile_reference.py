"""bench/profile_reference.py profiles the PyTorch reference end to end, both phases."""

import json

import pytest

pytest.importorskip("torch")

from bench import profile_reference  # noqa: E402


@pytest.mark.parametrize("phase", ["train", "sample"])
def test_reference_profile_of_one_small_step(tmp_path, capsys, phase):
    out = tmp_path / "profile.json"
    assert profile_reference.main(["--phase", phase, "--batch", "1", "--steps", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    calls = {row["name"]: row["calls"] for row in result["operators"]}
    assert calls["aten::convolution"] == 48  # the example network's 46 convs and 2 transposed ones
    assert ("aten::convolution_backward" in calls) == (phase == "train")
    assert result["self_seconds_per_step"] == pytest.approx(sum(r["self_seconds"] for r in result["operators"]))
    assert "aten::convolution" in capsys.readouterr().out
