"""Training on the tiny preset: the loss falls, files appear, and resume is exact."""

import numpy as np

from tinyddpm.checkpoint import load_checkpoint
from tinyddpm.train import TrainOptions, train


def options(folder, **kw):
    base = dict(preset="tiny", batch_size=16, epochs=2, data=folder, num_steps=50, preview_every=0, seed=3)
    return TrainOptions(**{**base, **kw})


def test_loss_falls_and_files_appear(tmp_path, digit_folder):
    result = train(options(digit_folder, epochs=6, learning_rate=2e-3, preview_every=6), tmp_path,
                   progress=False, log=lambda *_: None)
    assert result["steps"] == 36  # 96 // 16 = 6 updates an epoch, 6 epochs
    losses = np.genfromtxt(tmp_path / "loss.csv", delimiter=",", names=True)["loss"]
    assert len(losses) == 36
    assert losses[-6:].mean() < 0.7 * losses[:3].mean()
    for name in ("checkpoint.safetensors", "loss.png", "samples/step_000036.png"):
        assert (tmp_path / name).is_file(), name


def test_resume_reaches_the_same_weights(tmp_path, digit_folder):
    quiet = dict(progress=False, log=lambda *_: None)
    train(options(digit_folder), tmp_path / "straight", **quiet)
    first = train(options(digit_folder, max_steps=4), tmp_path / "resumed", **quiet)
    assert first["steps"] == 4
    second = train(options(digit_folder), tmp_path / "resumed", resume=True, **quiet)
    assert second["steps"] == 12

    a = load_checkpoint(tmp_path / "straight" / "checkpoint.safetensors")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.safetensors")
    assert a.train["step"] == b.train["step"] == 12
    assert a.adam["step"] == b.adam["step"] == 12
    for name in a.model:
        np.testing.assert_array_equal(a.model[name], b.model[name], err_msg=name)
        np.testing.assert_array_equal(a.adam["v"][name], b.adam["v"][name], err_msg=name)
    log_a = (tmp_path / "straight" / "loss.csv").read_text().splitlines()
    log_b = (tmp_path / "resumed" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[:4] for r in log_a] == [r.split(",")[:4] for r in log_b]
