"""Flower-free data layer: the offline Digits-5 benchmark, its cache and the source registry."""

from fedalign.data.cache import (
    array_checksum,
    build_all,
    default_cache_dir,
    ensure_domain,
    load_domain,
)
from fedalign.data.digits5 import BUILDER_VERSION, DIGIT_CLASSES, DIGITS5_DOMAINS, build_domain
from fedalign.data.montage import write_montage
from fedalign.data.sources import Digits5Source, DomainSource, get_source
from fedalign.data.types import DataError, DomainSplit

__all__ = [
    "BUILDER_VERSION",
    "DIGITS5_DOMAINS",
    "DIGIT_CLASSES",
    "DataError",
    "Digits5Source",
    "DomainSource",
    "DomainSplit",
    "array_checksum",
    "build_all",
    "build_domain",
    "default_cache_dir",
    "ensure_domain",
    "get_source",
    "load_domain",
    "write_montage",
]
