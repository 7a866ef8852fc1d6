"""Checkpoint files: round trip, atomic writes, and clear errors for bad files."""

import numpy as np
import pytest

from tinyddpm.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_model, save_checkpoint
from tinyddpm.unet import UNet, preset


def tiny_checkpoint():
    model = UNet(preset("tiny"), rng=np.random.default_rng(0))
    m = {k: np.full_like(v, 0.5) for k, v in model.state_dict().items()}
    return model, Checkpoint(model_config=model.config, model=model.state_dict(),
                             adam={"step": 7, "m": m, "v": m}, train={"step": 7, "epoch": 0})


def test_round_trip(tmp_path):
    model, ckpt = tiny_checkpoint()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, ckpt)
    back = load_checkpoint(path)
    assert back.model_config == model.config
    assert back.train == {"step": 7, "epoch": 0}
    assert back.adam["step"] == 7 and back.ema is None
    for name, value in ckpt.model.items():
        np.testing.assert_array_equal(back.model[name], value)
    np.testing.assert_array_equal(back.adam["m"]["conv_in.weight"], ckpt.adam["m"]["conv_in.weight"])
    loaded, _ = load_model(path)
    np.testing.assert_array_equal(loaded.r1.conv1.weight.data, model.r1.conv1.weight.data)
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary left behind


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    _, ckpt = tiny_checkpoint()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, ckpt)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("tinyddpm.checkpoint.os.replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, Checkpoint(model_config=ckpt.model_config, model=ckpt.model, train={"step": 8}))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file(tmp_path, damage):
    _, ckpt = tiny_checkpoint()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, ckpt)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x13" * 100, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="corrupt|not a"):
        load_checkpoint(path)


def test_mismatched_weights(tmp_path):
    _, ckpt = tiny_checkpoint()
    ckpt.model["conv_in.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, ckpt)
    with pytest.raises(CheckpointError, match="conv_in.weight"):
        load_model(path)


def test_other_safetensors_file_is_rejected(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, path)
    with pytest.raises(CheckpointError, match="not a tinyddpm checkpoint"):
        load_checkpoint(path)
