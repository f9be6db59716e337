"""Offline rendering utilities for the Digits-5 builders: fonts, glyphs, photos and colours.

Everything here reads files that ship inside installed packages (matplotlib fonts,
scikit-learn and scikit-image sample photos); nothing is downloaded. Loaders are cached
per process, and every random choice takes an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

import os
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fedalign.data.types import DataError

DIGITS = "0123456789"
# Computer Modern fonts whose code points '0'..'9' hold digits (cmex10/cmsy10 hold symbols).
_CM_DIGIT_FONTS = frozenset({"cmb10", "cmmi10", "cmr10", "cmss10", "cmti10", "cmtt10"})
# Photos by short name: (package holding the file, file name).
_PHOTO_FILES = {
    "china": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
    "astronaut": ("skimage", "astronaut.png"),
    "chelsea": ("skimage", "chelsea.png"),
    "coffee": ("skimage", "coffee.png"),
    "hubble_deep_field": ("skimage", "hubble_deep_field.jpg"),
    "ihc": ("skimage", "ihc.png"),
    "rocket": ("skimage", "rocket.jpg"),
    "motorcycle_left": ("skimage", "motorcycle_left.png"),
    "motorcycle_right": ("skimage", "motorcycle_right.png"),
    "retina": ("skimage", "retina.jpg"),
    "brick": ("skimage", "brick.png"),
    "grass": ("skimage", "grass.png"),
    "gravel": ("skimage", "gravel.png"),
    "camera": ("skimage", "camera.png"),
}
_LUMA = np.array([0.299, 0.587, 0.114])


def font_dir() -> Path:
    """Return matplotlib's bundled TrueType font folder."""
    import matplotlib  # imported here: a silo that only loads cached data never needs it

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _renders_digits(stem: str) -> bool:
    """The selection rule: DejaVu (not Display), STIXGeneral, and the CM text fonts."""
    if stem.startswith("DejaVu"):
        return "Display" not in stem
    return stem.startswith("STIXGeneral") or stem in _CM_DIGIT_FONTS


@lru_cache(maxsize=1)
def digit_fonts() -> tuple[Path, ...]:
    """Return the bundled fonts that render digits, checked to draw 10 distinct glyphs."""
    paths = tuple(sorted(p for p in font_dir().glob("*.ttf") if _renders_digits(p.stem)))
    if not paths:
        raise DataError(f"no digit fonts found in {font_dir()}; reinstall matplotlib")
    for path in paths:
        font = ImageFont.truetype(str(path), 32)
        glyphs = []
        for ch in DIGITS:
            canvas = Image.new("L", (64, 64))
            ImageDraw.Draw(canvas).text((8, 8), ch, font=font, fill=255)
            glyphs.append(canvas.tobytes())
        if not all(any(g) for g in glyphs) or len(set(glyphs)) != len(DIGITS):
            raise DataError(
                f"font {path.name} does not render 10 distinct digits; "
                "fix the font selection rule in fedalign/data/_render.py"
            )
    return paths


def _render_glyph(path: Path, size: int, ch: str) -> np.ndarray:
    """Render ``ch`` at point ``size`` and return its ink, cropped to the bounding box."""
    font = ImageFont.truetype(str(path), size)
    canvas = Image.new("L", (3 * size, 3 * size))
    ImageDraw.Draw(canvas).text((size, size // 2), ch, font=font, fill=255)
    return np.asarray(canvas.crop(canvas.getbbox()))


@cache
def _points_per_pixel(path: Path) -> float:
    """Point size per pixel of ink height of '8' (full height in lining and old-style fonts)."""
    return 100 / _render_glyph(path, 100, "8").shape[0]


@cache
def glyph(path: Path, height: int, digit: int) -> np.ndarray:
    """Return the uint8 ink mask of ``digit`` in font ``path``, about ``height`` pixels tall."""
    return _render_glyph(path, round(height * _points_per_pixel(path)), DIGITS[digit])


def paste_max(canvas: np.ndarray, mask: np.ndarray, cx: float, cy: float) -> None:
    """Merge ``mask`` into ``canvas`` (in place, by maximum) centred at (cx, cy), clipped."""
    h, w = mask.shape
    top, left = round(cy - h / 2), round(cx - w / 2)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, canvas.shape[0]), min(left + w, canvas.shape[1])
    if y0 >= y1 or x0 >= x1:
        return
    region = canvas[y0:y1, x0:x1]
    np.maximum(region, mask[y0 - top : y1 - top, x0 - left : x1 - left], out=region)


def rotate(mask: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate a uint8 mask counter-clockwise about its centre, keeping its size."""
    image = Image.fromarray(mask).rotate(degrees, resample=Image.Resampling.BICUBIC)
    return np.asarray(image)


@cache
def photo(name: str) -> Image.Image:
    """Load a bundled photo by short name as an RGB or greyscale (L) PIL image."""
    package, filename = _PHOTO_FILES[name]
    if package == "sklearn":
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(filename))
    import skimage

    image = Image.open(Path(os.path.dirname(skimage.__file__)) / "data" / filename)
    return image.convert("L" if image.mode in ("L", "LA", "I;16") else "RGB")


def random_crop(
    image: Image.Image, rng: np.random.Generator, out: int, min_side: int, max_side: int
) -> np.ndarray:
    """Crop a random square of random side in [min_side, max_side], resized to ``out`` px.

    Returns float32 pixels 0..255, shaped (out, out, 3) for RGB or (out, out) for greyscale.
    """
    side = int(rng.integers(min_side, min(max_side, *image.size) + 1))
    x = int(rng.integers(0, image.width - side + 1))
    y = int(rng.integers(0, image.height - side + 1))
    crop = image.resize((out, out), Image.Resampling.BILINEAR, box=(x, y, x + side, y + side))
    return np.asarray(crop, dtype=np.float32)


def luminance(rgb: np.ndarray) -> float:
    """Mean luma (0..255) of an RGB colour or an (..., 3) array of them."""
    return float(np.mean(np.asarray(rgb) @ _LUMA))


def contrasting_colour(
    rng: np.random.Generator, background_luma: float, min_delta: float
) -> np.ndarray:
    """Random RGB colour whose luma differs from ``background_luma`` by at least ``min_delta``.

    The hue is random; the colour is mixed towards white or black to reach the target luma.
    ``min_delta`` must be at most 127 so that one of the two directions is always possible.
    """
    can_lighten = background_luma + min_delta <= 255
    can_darken = background_luma - min_delta >= 0
    lighter = can_lighten and (not can_darken or rng.random() < 0.5)
    base = rng.uniform(0, 255, 3)
    luma = float(base @ _LUMA)
    if lighter:
        target = rng.uniform(background_luma + min_delta, 255)
        mix = (target - luma) / (255 - luma) if luma < 255 else 0.0
        return base + (255 - base) * np.clip(mix, 0, 1)
    target = rng.uniform(0, background_luma - min_delta)
    return base * min(target / luma, 1.0) if luma > 0 else base


def to_chw(image: np.ndarray) -> np.ndarray:
    """Round and clip an (H, W) or (H, W, 3) image to uint8 and return it as (3, H, W)."""
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
