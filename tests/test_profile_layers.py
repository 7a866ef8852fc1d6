"""bench/profile_layers.py runs end to end on the example network, both phases."""

import json

import pytest

from bench import profile_layers


@pytest.mark.parametrize("phase", ["train", "sample"])
def test_profile_of_one_small_step(tmp_path, capsys, phase):
    out = tmp_path / "profile.json"
    assert profile_layers.main(["--phase", phase, "--batch", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    by_type = result["by_type"]
    assert by_type["Conv2d"]["instances"] == 46 and by_type["Conv2d"]["forward"] > 0
    assert (by_type["Conv2d"]["backward"] > 0) == (phase == "train")
    assert by_type["GroupNormSwish"]["instances"] == 29
    assert "layer type (self time)" in capsys.readouterr().out
