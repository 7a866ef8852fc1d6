"""Training data: the built-in digits, a folder of images, or MNIST-style IDX files.

``load_dataset`` is the one entry point. Whatever the source, it returns images the way the
MATLAB example feeds them to the network: resized to 32x32 (bilinear, like
``augmentedImageDatastore``) and rescaled from uint8 0..255 to [-1, 1] by ``x / 127.5 - 1``,
channels-last float32 (N, 32, 32, C).
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tinyddpm.digits import load_digits

IMAGE_SIZE = 32
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}
IDX_IMAGES_MAGIC = 2051   # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049   # unsigned bytes, 1 dimension
# "train-images-idx3-ubyte", also "train-images.idx3-ubyte" as some mirrors name it, maybe .gz
IDX_IMAGES_NAME = re.compile(r"^(?P<prefix>.+)-images[-.]idx3-ubyte(\.gz)?$")


class DataError(ValueError):
    """The training data cannot be used; the message names the problem and the path."""


@dataclass
class Dataset:
    """Images ready for training.

    images: float32 (N, 32, 32, C) in [-1, 1], C = 1 or 3.
    labels: int64 (N,) indexing ``class_names``, or None when the source has no labels.
    source: a short description of where the images came from.
    """

    images: np.ndarray
    labels: np.ndarray | None
    class_names: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.images)


# ---------------------------------------------------------------------------- image folders

def _natural_key(name: str):
    """Sort "2" before "10": digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _image_files(root: Path) -> list[Path]:
    """Image files under ``root`` at any depth, sorted; hidden files and folders are skipped."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                files.append(Path(dirpath) / name)
    return sorted(files, key=lambda p: _natural_key(str(p.relative_to(root))))


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def _is_grayscale(image: Image.Image) -> bool:
    """Whether the file stores one channel (a palette counts as gray if all its colours are)."""
    if image.mode == "P":
        rgb = np.asarray(image.convert("RGB"))
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return image.mode in ("1", "L", "LA", "La", "I", "F") or image.mode.startswith("I;16")


def _convert(image: Image.Image, channels: int) -> Image.Image:
    """To "L" or "RGB", dropping any alpha channel; 16-bit gray keeps its full range."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).round().astype(np.uint8))
    return image.convert("L" if channels == 1 else "RGB")


def _resize(image: Image.Image) -> Image.Image:
    if image.size == (IMAGE_SIZE, IMAGE_SIZE):
        return image
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)


def load_image_folder(path: str | os.PathLike, channels: int | None = None):
    """Read every PNG/JPEG/BMP under ``path`` (any depth, extensions in any case).

    ``channels``: 1 converts everything to grayscale, 3 to RGB; None infers it from the files
    and raises DataError if some are grayscale and some colour (pass 1 or 3 to convert).
    Images are resized to 32x32 (bilinear, aspect not kept) like ``augmentedImageDatastore``.

    Labels come from folder names like ``imageDatastore(..., IncludeSubfolders=true,
    LabelSource="foldernames")``: each image's label is the name of the folder it sits in.
    If any image lies directly in ``path`` the folder is read as unlabelled (labels None).

    Returns ``(images uint8 (N, 32, 32, C), labels int64 (N,) or None, class_names or None)``,
    class names sorted naturally ("2" before "10").
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"data folder does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None (infer), got {channels!r} for {root}")
    files = _image_files(root)
    if not files:
        raise DataError(f"no PNG, JPEG or BMP images found in {root}")

    # One pass; only the 32x32 results are kept. Inferring, each file keeps its own channels.
    images, gray = [], []
    for f in files:
        image = _open_image(f)
        is_gray = _is_grayscale(image)
        gray.append(is_gray)
        target = channels or (1 if is_gray else 3)
        images.append(np.asarray(_resize(_convert(image, target))))
    if channels is None and len(set(gray)) > 1:
        raise DataError(
            f"mixed grayscale and colour images in {root} (e.g. {files[gray.index(True)]} is "
            f"grayscale, {files[gray.index(False)]} is colour); pass channels=1 or 3 to convert")
    channels = channels or (1 if gray[0] else 3)
    images = np.stack(images).reshape(len(files), IMAGE_SIZE, IMAGE_SIZE, channels)

    if any(f.parent == root for f in files):
        return images, None, None
    folder_names = [f.parent.name for f in files]
    class_names = sorted(set(folder_names), key=_natural_key)
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[name] for name in folder_names], dtype=np.int64)
    return images, labels, class_names


# ---------------------------------------------------------------------------- IDX (MNIST)

def _read_maybe_gzip(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    return data


def load_idx(images_path: str | os.PathLike, labels_path: str | os.PathLike | None = None):
    """Read MNIST-format IDX files, plain or gzipped.

    Returns ``(images uint8 (N, rows, cols), labels int64 (N,) or None)``. The header is checked:
    magic 2051 and N*rows*cols bytes of pixels for images; magic 2049 and N bytes for labels,
    with the same N.
    """
    images_path = Path(images_path)
    data = _read_maybe_gzip(images_path)
    if len(data) < 16:
        raise DataError(f"IDX image file too short for its header: {images_path}")
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != IDX_IMAGES_MAGIC:
        raise DataError(f"bad magic number {magic} in IDX image file {images_path} "
                        f"(expected {IDX_IMAGES_MAGIC})")
    if len(data) != 16 + n * rows * cols:
        raise DataError(f"IDX image file {images_path} holds {len(data) - 16} pixel bytes, "
                        f"header says {n} x {rows} x {cols}")
    images = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols).copy()
    if labels_path is None:
        return images, None

    labels_path = Path(labels_path)
    data = _read_maybe_gzip(labels_path)
    if len(data) < 8:
        raise DataError(f"IDX label file too short for its header: {labels_path}")
    magic, count = struct.unpack(">II", data[:8])
    if magic != IDX_LABELS_MAGIC:
        raise DataError(f"bad magic number {magic} in IDX label file {labels_path} "
                        f"(expected {IDX_LABELS_MAGIC})")
    if len(data) != 8 + count:
        raise DataError(f"IDX label file {labels_path} holds {len(data) - 8} labels, "
                        f"header says {count}")
    if count != n:
        raise DataError(f"IDX label file {labels_path} has {count} labels for {n} images")
    return images, np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)


def _idx_labels_for(images_path: Path) -> Path | None:
    """The label file next to an IDX image file (same prefix), if there is one."""
    prefix = IDX_IMAGES_NAME.match(images_path.name)["prefix"]
    for sep in ("-", "."):
        for gz in ("", ".gz"):
            candidate = images_path.with_name(f"{prefix}-labels{sep}idx1-ubyte{gz}")
            if candidate.is_file():
                return candidate
    return None


def _load_idx_files(paths: list[Path]):
    """Concatenate several IDX image files; labels only if every one has a label file."""
    parts = [load_idx(p, _idx_labels_for(p)) for p in paths]
    shapes = {images.shape[1:] for images, _ in parts}
    if len(shapes) > 1:
        raise DataError(f"IDX image files of different sizes {sorted(shapes)} in {paths[0].parent}")
    images = np.concatenate([images for images, _ in parts])
    if any(labels is None for _, labels in parts):
        return images, None
    return images, np.concatenate([labels for _, labels in parts])


# ---------------------------------------------------------------------------- entry point

def _resize_stack(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> uint8 (N, 32, 32), each image resized bilinearly with Pillow."""
    if images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    return np.stack([np.asarray(_resize(Image.fromarray(image))) for image in images])


def _gray_to_channels(images: np.ndarray, channels: int | None) -> np.ndarray:
    """uint8 (N, H, W) grayscale -> (N, H, W, C): C = 1, or 3 by repeating when asked for RGB."""
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None (infer), got {channels!r}")
    images = images[..., None]
    return np.repeat(images, 3, axis=-1) if channels == 3 else images


def _to_unit_range(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def load_dataset(data: str | os.PathLike | None = None, channels: int | None = None,
                 seed: int = 0) -> Dataset:
    """Load training images from ``data``.

    - None: the built-in digits (``tinyddpm.digits``, generated from ``seed`` and cached).
    - a folder holding ``*-images-idx3-ubyte[.gz]`` files: those, concatenated in name order,
      labelled from the matching ``*-labels-idx1-ubyte[.gz]`` files when all are present.
    - an IDX image file: that file (and its label file, if next to it).
    - any other folder: the images in it (``load_image_folder``).

    ``channels`` None keeps the data's own channel count; 1 or 3 converts (grayscale data is
    repeated into three equal channels for 3).
    """
    if data is None:
        digits, labels = load_digits(seed)
        images = _gray_to_channels(_resize_stack(digits), channels)
        return Dataset(_to_unit_range(images), labels, [str(d) for d in range(10)],
                       f"built-in digits (seed {seed})")

    path = Path(data)
    if not path.exists():
        raise DataError(f"data path does not exist: {path}")
    if path.is_file():
        if not IDX_IMAGES_NAME.match(path.name):
            raise DataError(f"not a folder or an IDX image file (*-images-idx3-ubyte): {path}")
        idx_files = [path]
    else:
        idx_files = sorted(p for p in path.iterdir() if p.is_file() and IDX_IMAGES_NAME.match(p.name))

    if idx_files:
        raw, labels = _load_idx_files(idx_files)
        images = _gray_to_channels(_resize_stack(raw), channels)
        class_names = None if labels is None else [str(v) for v in range(int(labels.max()) + 1)]
        source = f"IDX {', '.join(p.name for p in idx_files)} in {idx_files[0].parent}"
        return Dataset(_to_unit_range(images), labels, class_names, source)

    images, labels, class_names = load_image_folder(path, channels)
    return Dataset(_to_unit_range(images), labels, class_names, f"image folder {path}")
