"""Pictures: image grids, sampling GIFs, the forward-process strip and contact sheets.

Images come in channels-last, shape (N, H, W, C) with C 1 or 3, either float in [-1, 1] (the
model's range; clipped here, for display only) or already uint8. A 3-D array is read as
(N, H, W), one channel.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 0..255 (-1 -> 0, 0 -> 128, 1 -> 255). uint8 passes through."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.rint((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def _as_nhwc(images) -> np.ndarray:
    images = to_uint8(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (N, H, W) or (N, H, W, 1|3), got shape {images.shape}")
    return images


def _to_pil(array: np.ndarray) -> Image.Image:
    """uint8 (H, W, 1|3) or (H, W) -> a Pillow image, "L" or "RGB"."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(np.ascontiguousarray(array))


def make_grid(images, ncols: int | None = None, padding: int = 2, scale: int = 1,
              pad_value: int = 128) -> np.ndarray:
    """Tile N images into one uint8 (H, W, C) picture.

    ``ncols`` defaults to ceil(sqrt(N)), a near-square grid. ``padding`` pixels of grey
    ``pad_value`` go around and between the tiles; empty cells stay grey. The finished grid is
    enlarged ``scale`` times by pixel repetition (nearest neighbour), so 32x32 tiles stay sharp.
    """
    images = _as_nhwc(images)
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((padding + nrows * (h + padding), padding + ncols * (w + padding), c),
                   pad_value, dtype=np.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, ncols)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = image
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def _prepare(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_grid(images, path: str | os.PathLike, ncols: int | None = None, scale: int = 4) -> Path:
    """Save ``make_grid(images, ncols, scale=scale)`` as a PNG (parent folders are created)."""
    path = _prepare(path)
    _to_pil(make_grid(images, ncols=ncols, scale=scale)).save(path)
    return path


def save_gif(frames, path: str | os.PathLike, duration_ms: int = 80,
             final_hold_ms: int = 1500) -> Path:
    """Save uint8 frames (each (H, W) or (H, W, 1|3), e.g. from ``make_grid``) as a looping GIF.

    Every frame shows for ``duration_ms`` except the last, which holds for ``final_hold_ms``.
    (Pillow merges a frame identical to the one before into it, adding up their durations.)
    """
    if len(frames) == 0:
        raise ValueError("save_gif needs at least one frame")
    path = _prepare(path)
    pictures = [_to_pil(to_uint8(frame)) for frame in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [final_hold_ms]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return path


def _caption_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1: fixed-size bitmap font only
        return ImageFont.load_default()


def save_noise_strip(images, labels, path: str | os.PathLike, scale: int = 4,
                     padding: int = 8) -> Path:
    """Save a row of images, each with a caption under it (e.g. "t = 100"), on white.

    ``labels`` are the caption strings, one per image. Used for the forward-process picture.
    """
    images = _as_nhwc(images)
    labels = [str(label) for label in labels]
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} captions")
    n, h, w, _ = images.shape
    tile_h, tile_w = h * scale, w * scale
    font = _caption_font(max(12, tile_h // 8))
    text_h = max(ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), s, font=font)[3]
                 for s in labels)
    caption_h = text_h + 2 * padding
    strip = Image.new("RGB", (padding + n * (tile_w + padding), padding + tile_h + caption_h),
                      "white")
    draw = ImageDraw.Draw(strip)
    for i, (image, label) in enumerate(zip(images, labels)):
        left = padding + i * (tile_w + padding)
        tile = image.repeat(scale, axis=0).repeat(scale, axis=1)
        strip.paste(_to_pil(tile).convert("RGB"), (left, padding))
        draw.text((left + tile_w / 2, padding + tile_h + padding), label, fill="black",
                  font=font, anchor="ma")
    path = _prepare(path)
    strip.save(path)
    return path


def save_contact_sheet(images, labels, path: str | os.PathLike, per_class: int = 10,
                       scale: int = 3) -> Path:
    """Save a sheet with one row per class: the first ``per_class`` images of each label.

    Rows follow the sorted distinct labels; a class with fewer images leaves grey cells.
    """
    images = _as_nhwc(images)
    labels = np.asarray(labels)
    _, h, w, c = images.shape
    classes = np.unique(labels)
    sheet = np.full((len(classes) * per_class, h, w, c), 128, dtype=np.uint8)
    for row, label in enumerate(classes):
        members = images[labels == label][:per_class]
        sheet[row * per_class: row * per_class + len(members)] = members
    path = _prepare(path)
    _to_pil(make_grid(sheet, ncols=per_class, scale=scale)).save(path)
    return path
