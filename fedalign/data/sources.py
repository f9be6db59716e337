"""The one loader interface for domain data, and the registry of implementations.

A source is a named collection of domains (one silo each) that loads any of them as a
``DomainSplit``: ``digits5`` (the offline benchmark), ``imagefolder`` and ``npz`` (a site's own
folder: ``fedalign/data/folders.py``), ``digit_five`` and ``torchvision`` (published data already
on disk: ``fedalign/data/published.py``). To add one, write a class with ``name``, ``domains()``
and ``load()`` and add it to ``_SOURCES``; ``get_source(name, **kwargs)`` passes the keyword
arguments to its constructor (``cache_dir``: the silo's data folder, ``seed``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from fedalign.data.cache import Rebuild, load_domain
from fedalign.data.digits5 import DIGITS5_DOMAINS
from fedalign.data.folders import ImageFolderSource, NpzSource
from fedalign.data.published import DigitFiveSource, TorchvisionSource
from fedalign.data.types import DataError, DomainSplit


@runtime_checkable
class DomainSource(Protocol):
    """A named collection of domains, each loadable as a validated ``DomainSplit``."""

    name: str

    def domains(self) -> tuple[str, ...]:
        """Names of the domains this source can load."""
        ...

    def load(self, domain: str) -> DomainSplit:
        """Load one domain; raise ``DataError`` for an unknown domain or broken data."""
        ...


class Digits5Source:
    """The offline Digits-5 benchmark, built from package-bundled data and cached on disk."""

    name = "digits5"

    def __init__(
        self, cache_dir: Path | str | None = None, seed: int = 0, rebuild: Rebuild = "auto"
    ) -> None:
        self.cache_dir = cache_dir
        self.seed = seed
        self.rebuild: Rebuild = rebuild

    def domains(self) -> tuple[str, ...]:
        """The five Digits-5 domains."""
        return DIGITS5_DOMAINS

    def load(self, domain: str) -> DomainSplit:
        """Load (building or repairing the cache as ``rebuild`` allows) one domain."""
        return load_domain(domain, self.cache_dir, self.seed, self.rebuild)


_SOURCES: dict[str, Callable[..., DomainSource]] = {
    "digits5": Digits5Source,
    "imagefolder": ImageFolderSource,
    "npz": NpzSource,
    "digit_five": DigitFiveSource,
    "torchvision": TorchvisionSource,
}


def source_names() -> tuple[str, ...]:
    """The registered data sources (``data.source``)."""
    return tuple(sorted(_SOURCES))


def get_source(name: str, **kwargs: object) -> DomainSource:
    """Create the registered source ``name`` with ``kwargs`` passed to its constructor."""
    if name not in _SOURCES:
        raise DataError(f"unknown data source '{name}' (known: {', '.join(sorted(_SOURCES))})")
    return _SOURCES[name](**kwargs)
