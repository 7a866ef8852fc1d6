"""The command line: the main jobs run, and bad input gets one clear line, never a traceback."""

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tinyddpm.backend import gpu_unavailable_reason
from tinyddpm.checkpoint import Checkpoint, save_checkpoint
from tinyddpm.cli import main
from tinyddpm.unet import UNet, preset


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *words):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("Error")]
    assert len(error) == 1, result.output
    for word in words:
        assert word in error[0], error[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    model = UNet(preset("tiny"), rng=np.random.default_rng(0))
    save_checkpoint(path, Checkpoint(model_config=model.config, model=model.state_dict(),
                                     train={"step": 0, "options": {"num_steps": 20}}))
    return path


def test_sample_writes_grids_and_gif(tiny_checkpoint, tmp_path):
    result = run("sample", "--checkpoint", tiny_checkpoint, "--num-images", 4, "--display-every", 5,
                 "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "denoising.gif").is_file()
    steps = sorted(p.name for p in (tmp_path / "steps").iterdir())
    assert steps == ["t_000.png", "t_005.png", "t_010.png", "t_015.png", "t_020.png"]
    with Image.open(tmp_path / "denoising.gif") as gif:
        assert gif.n_frames >= 2


def test_sample_ddim(tiny_checkpoint, tmp_path):
    result = run("sample", "--checkpoint", tiny_checkpoint, "--sampler", "ddim", "--steps", 5,
                 "--num-images", 2, "--display-every", 0, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "samples.png").is_file() and not (tmp_path / "steps").exists()


def test_noise_picture(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "3"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(folder / "a.png")
    result = run("noise", "--data", tmp_path / "data", "--out", tmp_path / "noise.png")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "noise.png") as image:
        assert image.width > 4 * image.height  # six captioned frames in a row


def test_missing_data_folder(tmp_path):
    assert_one_line_error(run("train", "--data", tmp_path / "nope", "--out", tmp_path / "run"), "does not exist")


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("train", "--data", tmp_path / "empty", "--out", tmp_path / "run"), "no PNG")


def test_fewer_images_than_the_batch(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(folder / "a.png")
    result = run("train", "--data", folder, "--batch-size", 4, "--out", tmp_path / "run")
    assert_one_line_error(result, "batch size 4", "1 training images")


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(run("sample", "--checkpoint", tmp_path / "nope.safetensors"), "not found")


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 64)
    assert_one_line_error(run("sample", "--checkpoint", path, "--out", tmp_path), "broken.safetensors")


def test_resume_without_a_checkpoint(tmp_path):
    assert_one_line_error(run("train", "--resume", "--out", tmp_path / "run"), "not found")


def test_digit_needs_a_conditional_model(tiny_checkpoint, tmp_path):
    result = run("sample", "--checkpoint", tiny_checkpoint, "--digit", "7", "--out", tmp_path)
    assert_one_line_error(result, "--conditional")


@pytest.mark.skipif(gpu_unavailable_reason() is None, reason="a GPU is present")
def test_gpu_without_cupy_or_gpu(tmp_path, tiny_checkpoint):
    assert_one_line_error(run("sample", "--checkpoint", tiny_checkpoint, "--device", "gpu"), "--device gpu")
    assert_one_line_error(run("train", "--device", "gpu", "--out", tmp_path), "--device gpu")


def test_tf32_needs_the_gpu(tiny_checkpoint):
    assert_one_line_error(run("sample", "--checkpoint", tiny_checkpoint, "--tf32"), "--tf32", "--device gpu")


@pytest.mark.gpu
def test_gpu_training_with_tf32(digit_folder, tmp_path):
    """Through ``python -m tinyddpm`` in a process of its own: TF32, once chosen, holds for the
    process, and the other GPU tests here compare float32 against tight bounds."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        pytest.skip(f"gpu: {reason}")
    done = subprocess.run([sys.executable, "-m", "tinyddpm", "train", "--device", "gpu", "--tf32",
                           "--preset", "tiny", "--batch-size", "16", "--max-steps", "3", "--preview-every", "0",
                           "--data", digit_folder, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "checkpoint.safetensors").is_file()


def test_gradcheck_command_passes():
    result = run("gradcheck")
    assert result.exit_code == 0, result.output
    assert "checks passed" in result.output and "FAIL" not in result.output
