"""The built-in digits, user image folders, IDX files and load_dataset."""

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from tinyddpm.datasets import DataError, load_dataset, load_idx, load_image_folder
from tinyddpm.digits import export_digits, find_fonts, load_digits, make_digits


@pytest.fixture(scope="module")
def small_digits():
    return make_digits(seed=0, per_class=6)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("TINYDDPM_CACHE", str(folder))
    return folder


# ---------------------------------------------------------------------------- built-in digits

def test_digits_shapes_and_counts(small_digits):
    images, labels = small_digits
    assert images.shape == (60, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60,) and labels.dtype == np.int64
    assert np.array_equal(np.bincount(labels), [6] * 10)
    # white digit on black: dark border, every image reaches full white
    assert images[:, 0, :].max() == 0 and images[:, -1, :].max() == 0
    assert images[:, :, 0].max() == 0 and images[:, :, -1].max() == 0
    assert (images.reshape(60, -1).max(axis=1) == 255).all()


def test_digits_deterministic(small_digits):
    images, labels = make_digits(seed=0, per_class=6)
    assert images.tobytes() == small_digits[0].tobytes()
    assert np.array_equal(labels, small_digits[1])
    other, _ = make_digits(seed=1, per_class=6)
    assert other.tobytes() != images.tobytes()


def test_fonts_found():
    fonts = find_fonts()
    assert fonts[0] == ("pillow-default", None)
    assert fonts == sorted(fonts, key=lambda f: (f[1] is not None, f[1] or ""))


def test_load_digits_caches(tmp_path, small_digits):
    images, labels = load_digits(seed=0, cache_dir=tmp_path, per_class=6)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and "seed0" in files[0].name and not list(tmp_path.glob("*.tmp"))
    assert images.tobytes() == small_digits[0].tobytes()
    again, again_labels = load_digits(seed=0, cache_dir=tmp_path, per_class=6)
    assert again.tobytes() == images.tobytes() and np.array_equal(again_labels, labels)
    files[0].write_bytes(b"not an npz")   # a broken cache file is regenerated
    assert load_digits(seed=0, cache_dir=tmp_path, per_class=6)[0].tobytes() == images.tobytes()


def test_export_layout(tmp_path, small_digits):
    out = export_digits(tmp_path / "DigitsData", seed=0, per_class=6)
    for digit in range(10):
        names = sorted(p.name for p in (out / str(digit)).iterdir())
        assert names == [f"image_{i:04d}.png" for i in range(6)]
    first_three = np.asarray(Image.open(out / "3" / "image_0000.png"))
    assert np.array_equal(first_three, small_digits[0][small_digits[1] == 3][0])
    # the exported tree reads back through the folder loader with the right labels
    _, labels, names = load_image_folder(out)
    assert names == [str(d) for d in range(10)] and np.array_equal(labels, small_digits[1])


def test_load_dataset_builtin(cache):
    data = load_dataset()
    assert data.images.shape == (10000, 32, 32, 1) and data.images.dtype == np.float32
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert np.array_equal(np.bincount(data.labels), [1000] * 10)
    assert data.class_names == [str(d) for d in range(10)]
    assert list(cache.glob("digits-*.npz"))
    assert load_dataset(channels=3).images.shape == (10000, 32, 32, 3)


# ---------------------------------------------------------------------------- image folders

def _write(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def _gray(value, size=(20, 24)):
    return np.full(size, value, dtype=np.uint8)


def _rgb(rgb, size=(40, 30)):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), size + (3,)).copy()


def test_folder_with_classes(tmp_path):
    _write(tmp_path / "cat" / "a.png", _gray(10))
    _write(tmp_path / "cat" / "b.JPG", _gray(200))
    _write(tmp_path / "dog" / "c.jpeg", _gray(90))
    _write(tmp_path / "dog" / "deep" / "d.bmp", _gray(60))   # label is the immediate folder
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    images, labels, names = load_image_folder(tmp_path)
    assert images.shape == (4, 32, 32, 1) and images.dtype == np.uint8
    assert names == ["cat", "deep", "dog"]
    assert labels.tolist() == [0, 0, 2, 1] and labels.dtype == np.int64
    assert images[0].max() == 10 and abs(int(images[1].mean()) - 200) <= 2


def test_folder_flat_rgb_and_conversion(tmp_path):
    _write(tmp_path / "x.png", _rgb((255, 0, 0)))
    _write(tmp_path / "y.png", _rgb((0, 0, 255)))
    images, labels, names = load_image_folder(tmp_path)
    assert images.shape == (2, 32, 32, 3) and labels is None and names is None
    assert images[0, 5, 5].tolist() == [255, 0, 0]
    gray, _, _ = load_image_folder(tmp_path, channels=1)
    assert gray.shape == (2, 32, 32, 1)
    assert gray[0, 5, 5, 0] == np.asarray(Image.new("RGB", (1, 1), (255, 0, 0)).convert("L"))[0, 0]


def test_folder_mixed_channels(tmp_path):
    _write(tmp_path / "a.png", _gray(0))
    _write(tmp_path / "b.png", _rgb((1, 2, 3)))
    with pytest.raises(DataError, match="mixed grayscale and colour"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, channels=3)[0].shape == (2, 32, 32, 3)
    data = load_dataset(tmp_path, channels=1)
    assert data.images.shape == (2, 32, 32, 1) and data.images[0].min() == -1.0


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist.*missing"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        load_image_folder(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG, JPEG or BMP images"):
        load_image_folder(tmp_path / "empty")
    _write(tmp_path / "bad" / "good.png", _gray(5))
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        load_image_folder(tmp_path / "bad")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")


# ---------------------------------------------------------------------------- IDX

def _idx_images(images):
    n, rows, cols = images.shape
    return struct.pack(">IIII", 2051, n, rows, cols) + images.tobytes()


def _idx_labels(labels):
    return struct.pack(">II", 2049, len(labels)) + bytes(labels)


def test_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = [3, 1, 4, 1, 5]
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_images(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_labels(labels))
    got, got_labels = load_idx(tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte")
    assert np.array_equal(got, images) and got_labels.tolist() == labels
    assert got_labels.dtype == np.int64

    zipped = tmp_path / "zipped"
    zipped.mkdir()
    (zipped / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_images(images)))
    (zipped / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_labels(labels)))
    got, got_labels = load_idx(zipped / "t10k-images-idx3-ubyte.gz")
    assert np.array_equal(got, images) and got_labels is None

    for source in (zipped, zipped / "t10k-images-idx3-ubyte.gz"):   # folder or file
        data = load_dataset(source)
        assert data.images.shape == (5, 32, 32, 1) and data.labels.tolist() == labels
        assert data.class_names == [str(d) for d in range(6)]
        assert -1.0 <= data.images.min() and data.images.max() <= 1.0


def test_idx_errors(tmp_path):
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(struct.pack(">IIII", 2049, 1, 2, 2) + bytes(4))
    with pytest.raises(DataError, match="bad magic number 2049 .*bad-images-idx3-ubyte"):
        load_idx(bad)
    short = tmp_path / "short-images-idx3-ubyte"
    short.write_bytes(struct.pack(">IIII", 2051, 2, 2, 2) + bytes(5))
    with pytest.raises(DataError, match="header says 2 x 2 x 2"):
        load_idx(short)
    good = tmp_path / "good-images-idx3-ubyte"
    good.write_bytes(_idx_images(np.zeros((2, 2, 2), np.uint8)))
    labels = tmp_path / "good-labels-idx1-ubyte"
    labels.write_bytes(_idx_labels([1, 2, 3]))
    with pytest.raises(DataError, match="3 labels for 2 images"):
        load_idx(good, labels)
    labels.write_bytes(struct.pack(">II", 2051, 2) + bytes(2))
    with pytest.raises(DataError, match="bad magic number 2051 in IDX label file"):
        load_idx(good, labels)
