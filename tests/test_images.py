"""Grids, uint8 conversion, GIFs, the noise strip and contact sheets."""

import numpy as np
from PIL import Image

from tinyddpm.images import (make_grid, save_contact_sheet, save_gif, save_grid,
                             save_noise_strip, to_uint8)


def test_to_uint8():
    x = np.array([-1.0, 0.0, 1.0, -3.0, 2.0], dtype=np.float32)
    assert to_uint8(x).tolist() == [0, 128, 255, 0, 255]
    assert to_uint8(x).dtype == np.uint8
    # inverse of the loader's x / 127.5 - 1
    levels = np.arange(256, dtype=np.uint8)
    assert np.array_equal(to_uint8(levels.astype(np.float32) / 127.5 - 1), levels)


def test_grid_shapes():
    images = np.zeros((10, 32, 32, 1), dtype=np.float32)
    assert make_grid(images).shape == (2 + 3 * 34, 2 + 4 * 34, 1)        # 4 columns, 3 rows
    assert make_grid(images, ncols=5, padding=0).shape == (64, 160, 1)
    assert make_grid(np.zeros((16, 32, 32, 1)), scale=2).shape == (2 * 138, 2 * 138, 1)
    rgb = make_grid(np.ones((3, 8, 8, 3)), ncols=3, padding=1)
    assert rgb.shape == (10, 28, 3) and rgb.dtype == np.uint8
    assert rgb[1, 1].tolist() == [255, 255, 255] and rgb[0, 0].tolist() == [128, 128, 128]
    assert make_grid(np.zeros((4, 28, 28), np.uint8)).shape == (62, 62, 1)   # (N, H, W) input


def test_save_grid(tmp_path):
    path = save_grid(np.zeros((4, 32, 32, 3)), tmp_path / "new" / "grid.png", scale=2)
    with Image.open(path) as image:
        assert image.size == (2 * 70, 2 * 70) and image.mode == "RGB"


def test_gif_frames(tmp_path):
    frames = [make_grid(np.full((4, 8, 8, 1), v, np.float32)) for v in np.linspace(-1, 1, 7)]
    path = save_gif(frames, tmp_path / "sampling.gif", duration_ms=50, final_hold_ms=1000)
    with Image.open(path) as gif:
        assert gif.n_frames == 7 and gif.info.get("loop") == 0
        gif.seek(6)
        assert gif.info["duration"] == 1000


def test_noise_strip_and_contact_sheet(tmp_path):
    images = np.linspace(-1, 1, 6 * 32 * 32).reshape(6, 32, 32, 1)
    path = save_noise_strip(images, [f"t = {t}" for t in range(0, 600, 100)], tmp_path / "strip.png")
    with Image.open(path) as strip:
        assert strip.width > 6 * 128 and strip.height > 128
    labels = np.repeat(np.arange(10), 3)
    sheet = save_contact_sheet(np.zeros((30, 28, 28), np.uint8), labels, tmp_path / "sheet.png",
                               per_class=10, scale=1)
    with Image.open(sheet) as image:
        assert image.size == (2 + 10 * 30, 2 + 10 * 30)
