"""A site's own data on disk, behind the one loader interface (``fedalign.data.sources``).

- ``ImageFolderSource``: an ImageFolder tree, ``root/<class>/<image>`` (split deterministically
  into train/test) or ``root/train/<class>/...`` + ``root/test/<class>/...``; images of any size
  and mode are converted to ``channels`` and resized to ``image_size`` x ``image_size``.
- ``NpzSource``: ``.npz`` feature files with ``x`` (N, D), ``y`` (N,) and optionally ``domain``
  (N,) (one file holding several domains, e.g. Office-Caltech10 DeCAF features), ``split``
  (N,) of ``train``/``test`` and ``classes`` (names). Bags of words and tabular data alike.

Both load one silo's folder (the SuperNode's ``data-dir``) and raise ``DataError`` with one line
that names the file and says what to do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedalign.data.types import DataError, DomainSplit

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """A boolean test mask holding ``test_fraction`` of every class (at least one sample of a
    class with two or more), fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        count = round(len(idx) * test_fraction)
        test[idx[: max(count, 1) if len(idx) > 1 else 0]] = True
    return test


def _folder(root: Path | str | None, what: str) -> Path:
    if root is None:
        raise DataError(f"{what}: no data folder; give the silo one (node-config data-dir=...)")
    path = Path(root)
    if not path.exists():
        raise DataError(f"{what}: data folder {path} does not exist; check data-dir")
    return path


class ImageFolderSource:
    """One silo's ImageFolder tree (see the module docstring)."""

    name = "imagefolder"

    def __init__(
        self,
        cache_dir: Path | str | None = None,
        seed: int = 0,
        image_size: int = 28,
        channels: int = 3,
        test_fraction: float = 0.2,
    ) -> None:
        self.root = cache_dir
        self.seed = seed
        self.image_size = image_size
        self.channels = channels
        self.test_fraction = test_fraction

    def domains(self) -> tuple[str, ...]:
        return (_folder(self.root, "imagefolder").name,)

    def _read(self, tree: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        mode = {1: "L", 3: "RGB"}.get(self.channels)
        if mode is None:
            raise DataError(f"imagefolder: channels={self.channels} (use 1 or 3)")
        images, labels = [], []
        for label, name in enumerate(classes):
            files = sorted(
                p for p in (tree / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
            )
            for path in files:
                try:
                    with Image.open(path) as image:
                        image = image.convert(mode).resize(
                            (self.image_size, self.image_size), Image.Resampling.BILINEAR
                        )
                        pixels = np.asarray(image, dtype=np.uint8)
                except (OSError, UnidentifiedImageError, ValueError) as exc:
                    raise DataError(
                        f"imagefolder: {path} is not a readable image ({type(exc).__name__}); "
                        "fix or remove it"
                    ) from None
                images.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
                labels.append(label)
        shape = (0, self.channels, self.image_size, self.image_size)
        x = np.stack(images) if images else np.zeros(shape, np.uint8)
        return x, np.asarray(labels, dtype=np.int64)

    @staticmethod
    def _classes(tree: Path) -> list[str]:
        return sorted(p.name for p in tree.iterdir() if p.is_dir() and not p.name.startswith("."))

    def load(self, domain: str) -> DomainSplit:
        root = _folder(self.root, "imagefolder")
        if (root / "train").is_dir() and (root / "test").is_dir():
            classes = self._classes(root / "train")
            if self._classes(root / "test") != classes:
                raise DataError(
                    f"imagefolder: {root}/train and {root}/test have different class folders; "
                    "give both the same ones"
                )
            x_train, y_train = self._read(root / "train", classes)
            x_test, y_test = self._read(root / "test", classes)
        else:
            classes = self._classes(root)
            if not classes:
                raise DataError(
                    f"imagefolder: {root} has no class folders; lay it out as "
                    f"{root}/<class>/<image>"
                )
            x, y = self._read(root, classes)
            test = stratified_split(y, self.test_fraction, self.seed)
            x_train, y_train, x_test, y_test = x[~test], y[~test], x[test], y[test]
        split = DomainSplit(domain, x_train, y_train, x_test, y_test, tuple(classes))
        return split.validate(fix=f"check the images under {root}")


class NpzSource:
    """One silo's ``.npz`` feature file (see the module docstring)."""

    name = "npz"

    def __init__(
        self,
        cache_dir: Path | str | None = None,
        seed: int = 0,
        test_fraction: float = 0.2,
        classes: tuple[str, ...] | None = None,
    ) -> None:
        self.root = cache_dir
        self.seed = seed
        self.test_fraction = test_fraction
        self.classes = classes  # the federation's names, for a file that carries none

    def _file(self) -> Path:
        root = _folder(self.root, "npz")
        if root.is_file():
            return root
        files = sorted(root.glob("*.npz"))
        if len(files) != 1:
            raise DataError(
                f"npz: {root} holds {len(files)} .npz files; give the silo a folder with exactly "
                "one (x, y, optional domain, split, classes)"
            )
        return files[0]

    def _arrays(self) -> tuple[Path, dict[str, np.ndarray]]:
        path = self._file()
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError) as exc:
            raise DataError(f"npz: {path} is unreadable ({type(exc).__name__})") from None
        for key in ("x", "y"):
            if key not in arrays:
                raise DataError(f"npz: {path} has no array '{key}' (needs x (N, D) and y (N,))")
        return path, arrays

    def domains(self) -> tuple[str, ...]:
        path, arrays = self._arrays()
        if "domain" in arrays:
            return tuple(sorted({str(d) for d in arrays["domain"]}))
        return (path.stem,)

    def load(self, domain: str) -> DomainSplit:
        path, arrays = self._arrays()
        x, y = arrays["x"], arrays["y"]
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"npz: {path}: x is {x.shape} and y is {y.shape}; need x (N, D) and y (N,)"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"npz: {path}: y is {y.dtype}; labels must be integers 0..K-1")
        rows = np.ones(len(y), dtype=bool)
        if "domain" in arrays:
            rows = arrays["domain"].astype(str) == domain
            if not rows.any():
                known = ", ".join(sorted({str(d) for d in arrays["domain"]}))
                raise DataError(f"npz: {path} has no rows of domain '{domain}' (it has: {known})")
        if "classes" in arrays:
            classes = tuple(str(c) for c in arrays["classes"])
        else:
            classes = self.classes or tuple(
                str(i) for i in range(int(y.max()) + 1 if len(y) else 0)
            )
        x, y = x[rows].astype(np.float32), y[rows].astype(np.int64)
        if "split" in arrays:
            test = arrays["split"].astype(str)[rows] == "test"
        else:
            test = stratified_split(y, self.test_fraction, self.seed)
        split = DomainSplit(domain, x[~test], y[~test], x[test], y[test], classes)
        return split.validate(fix=f"fix {path}")
