"""The built-in dataset: a synthetic stand-in for MATLAB's DigitsData.

DigitsData is 10,000 grayscale 28x28 images, 1,000 per digit, each a digit glyph from one of
several fonts under a random affine transform, white on black. This module makes the same kind
of set from the fonts on this machine: Pillow's built-in font (always present) plus the TrueType
and OpenType fonts in the usual system font folders.

Each image: pick a font, a digit and a stroke thickness; render the glyph large (its ink cropped
tight); map it onto an 84x84 canvas by a random rotation, shear, aspect change, scale and shift,
sized from the glyph's actual ink so that nothing is clipped; box-filter the canvas down to
28x28; stretch so the brightest pixel is 255. Everything random comes from one
``numpy.random.Generator`` seeded by ``seed``, and the font list is sorted, so the same seed on
the same machine (same fonts, same Pillow and FreeType) gives the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFont, features

# Bump whenever a change here changes the images, so stale caches are not reused.
GENERATOR_VERSION = 1

IMAGE_SIZE = 28          # DigitsData images are 28x28
SUPERSAMPLE = 3          # draw on an 84x84 canvas, then box-filter down to 28x28
GLYPH_PX = 80            # font size the glyphs are rendered at (digit height about 60 px)
# Stroke thickness, in pixels at GLYPH_PX, drawn uniformly per image. A font whose strokes are
# thinner than the draw is thickened with Pillow's outline (stroke_width); a font already as
# thick is used as it is. At 28x28 this is about 1 to 5 pixels.
THICKNESS_RANGE = (4.0, 15.0)
MAX_OUTLINE = 5

# Ranges of the random transform.
MAX_ROTATION_DEG = 15.0
MAX_SHEAR = 0.25         # horizontal shear: x += shear * y
ASPECT_RANGE = (0.8, 1.2)        # horizontal stretch before rotation
HEIGHT_RANGE = (0.62, 0.80)      # ink height as a fraction of the image (MNIST: 20/28 = 0.71)
MAX_WIDTH = 0.86                 # ink width never more than this fraction of the image
MAX_SHIFT = 2.0                  # random offset of the ink centre, in 28x28 pixels
MARGIN = 1.0                     # ink always stays this many 28x28 pixels from the border

FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.local/share/fonts",
    "~/.fonts",
    "/Library/Fonts",
    "/System/Library/Fonts",
    "C:/Windows/Fonts",
)
# Fonts whose file name says the digits are not ordinary text digits.
SKIP_FONT_WORDS = ("symbol", "emoji", "icon", "dingbat", "wingding", "webding", "braille", "music")

DEFAULT_FONT_NAME = "pillow-default"


def _digits_are_real(font) -> bool:
    """True if the font draws ten different, non-empty digit glyphs (not ten missing-glyph boxes)."""
    masks = set()
    for ch in "0123456789":
        mask = font.getmask(ch)
        if mask.getbbox() is None:
            return False
        masks.add((mask.size, bytes(mask)))   # bytes(mask): its pixel values, row by row
    return len(masks) == 10


def find_fonts() -> list[tuple[str, str | None]]:
    """The fonts the generator uses, as sorted ``(name, path)`` pairs.

    The first is Pillow's built-in font (path None); the rest are the ``.ttf``/``.otf`` files
    found under ``FONT_DIRS`` that render ten distinct digits, sorted by path.
    """
    paths = set()
    for folder in FONT_DIRS:
        root = Path(folder).expanduser()
        if root.is_dir():
            for ext in ("ttf", "otf", "TTF", "OTF"):
                paths.update(root.rglob(f"*.{ext}"))
    fonts = [(DEFAULT_FONT_NAME, None)]
    for path in sorted(paths):
        if any(word in path.name.lower() for word in SKIP_FONT_WORDS):
            continue
        try:
            font = ImageFont.truetype(str(path), 24)
        except OSError:
            continue
        if _digits_are_real(font):
            fonts.append((path.name, str(path)))
    return fonts


def _load_font(path: str | None):
    if path is None:
        return ImageFont.load_default(size=GLYPH_PX)
    return ImageFont.truetype(path, GLYPH_PX)


def _render_glyph(font, digit: int, stroke: int) -> np.ndarray:
    """The digit drawn white on black at ``GLYPH_PX``, cropped to its ink: uint8 (h, w)."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        stroke = 0   # Pillow's bitmap fallback font (no FreeType) cannot outline
    ch = str(digit)
    left, top, right, bottom = font.getbbox(ch, stroke_width=stroke)
    pad = 4
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text(
        (pad - left, pad - top), ch, fill=255, font=font, stroke_width=stroke, stroke_fill=255
    )
    return np.asarray(canvas.crop(canvas.getbbox()))


def _stroke_thickness(glyph: np.ndarray) -> float:
    """Mean stroke width in pixels: ink area over half the ink's edge length."""
    ink = glyph > 127
    padded = np.pad(ink, 1)
    inside = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    edge = np.count_nonzero(ink & ~inside)
    return 2.0 * np.count_nonzero(ink) / max(edge, 1)


def _outline_points(glyph: np.ndarray) -> np.ndarray:
    """Centres of the leftmost and rightmost ink pixel of every row: float64 (P, 2) as (x, y).

    Every corner of the ink's convex hull is among them, so they bound the ink under any affine
    map at a fraction of the cost of moving every ink pixel.
    """
    ink = glyph > 0
    rows = np.flatnonzero(ink.any(axis=1))
    first = ink[rows].argmax(axis=1)
    last = ink.shape[1] - 1 - ink[rows, ::-1].argmax(axis=1)
    xs = np.concatenate([first, last])
    ys = np.concatenate([rows, rows])
    return np.stack([xs, ys], axis=1).astype(np.float64) + 0.5


class _GlyphCache:
    """Glyphs rendered on first use, with their outline points for sizing."""

    def __init__(self, fonts):
        self.fonts = [_load_font(path) for _, path in fonts]
        self.cache = {}
        self.thickness = {}

    def font_thickness(self, font_index: int) -> float:
        """The font's own stroke width at GLYPH_PX, averaged over the ten digits."""
        if font_index not in self.thickness:
            font = self.fonts[font_index]
            self.thickness[font_index] = float(
                np.mean([_stroke_thickness(_render_glyph(font, d, 0)) for d in range(10)]))
        return self.thickness[font_index]

    def get(self, font_index: int, digit: int, stroke: int):
        key = (font_index, digit, stroke)
        if key not in self.cache:
            glyph = _render_glyph(self.fonts[font_index], digit, stroke)
            self.cache[key] = (Image.fromarray(glyph), _outline_points(glyph))
        return self.cache[key]


def _place_glyph(glyph: Image.Image, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random affine of one glyph onto the supersampled canvas, reduced to uint8 (28, 28)."""
    canvas = IMAGE_SIZE * SUPERSAMPLE
    theta = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    shear = rng.uniform(-MAX_SHEAR, MAX_SHEAR)
    aspect = rng.uniform(*ASPECT_RANGE)
    height = rng.uniform(*HEIGHT_RANGE) * canvas
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=2) * SUPERSAMPLE

    # Linear part in image coordinates (x right, y down): rotate(shear(stretch(p))).
    cos, sin = np.cos(theta), np.sin(theta)
    rotate = np.array([[cos, -sin], [sin, cos]])
    linear = rotate @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([aspect, 1.0])

    # Size from where the ink actually lands, so the digit fills the frame but never leaves it.
    moved = points @ linear.T
    lo, hi = moved.min(axis=0), moved.max(axis=0)
    scale = min(height / (hi - lo)[1], MAX_WIDTH * canvas / (hi - lo)[0])
    linear = scale * linear
    # Pixel centres -> ink edges, plus the reach of bilinear sampling: 1.5 canvas pixels.
    lo, hi = scale * lo - 1.5, scale * hi + 1.5
    extent = hi - lo

    # Centre the ink box, shift it, and keep it MARGIN away from every border.
    room = (canvas - 2 * MARGIN * SUPERSAMPLE - extent) / 2
    shift = np.clip(shift, -np.maximum(room, 0), np.maximum(room, 0))
    offset = canvas / 2 + shift - (lo + hi) / 2      # canvas = linear @ glyph + offset

    # Pillow wants the inverse map, canvas -> glyph.
    inverse = np.linalg.inv(linear)
    inv_offset = -inverse @ offset
    coeffs = (inverse[0, 0], inverse[0, 1], inv_offset[0], inverse[1, 0], inverse[1, 1], inv_offset[1])
    big = glyph.transform((canvas, canvas), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    small = np.asarray(big.reduce(SUPERSAMPLE), dtype=np.float32)
    peak = small.max()
    if peak > 0:
        small *= 255.0 / peak
    return np.rint(small).astype(np.uint8)


def make_digits(seed: int = 0, per_class: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Generate the digit set.

    Returns ``images`` uint8 (N, 28, 28), white digit on black, and ``labels`` int64 (N,), with
    N = 10 * per_class, sorted by class (all zeros first), like DigitsData's folder order.
    """
    rng = np.random.default_rng(seed)
    fonts = find_fonts()
    glyphs = _GlyphCache(fonts)
    labels = np.repeat(np.arange(10, dtype=np.int64), per_class)
    n = labels.size
    font_ids = rng.integers(0, len(fonts), size=n)
    thickness = rng.uniform(*THICKNESS_RANGE, size=n)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i in range(n):
        font_index = int(font_ids[i])
        outline = round((thickness[i] - glyphs.font_thickness(font_index)) / 2)
        outline = min(max(outline, 0), MAX_OUTLINE)
        glyph, points = glyphs.get(font_index, int(labels[i]), outline)
        images[i] = _place_glyph(glyph, points, rng)
    return images, labels


def _cache_key(seed: int, per_class: int) -> str:
    """File name for one generated set; changes with anything that changes the pixels."""
    identity = "\n".join(
        [f"v{GENERATOR_VERSION}", f"pillow {PIL.__version__}", f"freetype {features.version('freetype2')}"]
        + [name for name, _ in find_fonts()]
    )
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return f"digits-v{GENERATOR_VERSION}-seed{seed}-n{per_class}-{digest}.npz"


def default_cache_dir() -> Path:
    return Path(os.environ.get("TINYDDPM_CACHE") or Path.home() / ".cache" / "tinyddpm")


def load_digits(seed: int = 0, cache_dir: str | os.PathLike | None = None,
                per_class: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """``make_digits(seed, per_class)``, cached as an .npz under ``cache_dir``.

    ``cache_dir`` defaults to ``$TINYDDPM_CACHE``, else ``~/.cache/tinyddpm``. The file name holds
    the seed, the generator version and a hash of the font list and Pillow/FreeType versions.
    A cache file that cannot be read is regenerated.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / _cache_key(seed, per_class)
    if path.exists():
        try:
            with np.load(path) as saved:
                return saved["images"], saved["labels"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass
    images, labels = make_digits(seed, per_class)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, images=images, labels=labels)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return images, labels


def export_digits(out_dir: str | os.PathLike, seed: int = 0, per_class: int = 1000) -> Path:
    """Write the set as PNGs in DigitsData's layout: ``out_dir/<digit>/image_<nnnn>.png``."""
    images, labels = make_digits(seed, per_class)
    out = Path(out_dir)
    counts = [0] * 10
    for image, label in zip(images, labels):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"image_{counts[label]:04d}.png")
        counts[label] += 1
    return out
