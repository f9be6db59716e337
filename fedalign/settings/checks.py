"""Checks of one config value, each failing with one line that names the key (``ConfigError``)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedalign.errors import ConfigError


def require(condition: bool, message: str) -> None:
    """Raise ``ConfigError("config: <message>")`` unless ``condition`` holds.

    Parameters
    ----------
    condition : bool
        What must hold.
    message : str
        The key and its problem, in one line.
    """
    if not condition:
        raise ConfigError(f"config: {message}")


def number(cfg: DictConfig, key: str, kind: type = int, minimum: float = 1) -> Any:
    """The value at ``key`` as ``kind`` (int or float), at least ``minimum``.

    Parameters
    ----------
    cfg : DictConfig
        The composed config.
    key : str
        Dotted path of the value, e.g. ``strategy.fisher.floor``.
    kind : type (default: int)
        ``int`` refuses floats and booleans; ``float`` takes any number.
    minimum : float (default: 1)
        The smallest allowed value.
    """
    value = OmegaConf.select(cfg, key)
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise TypeError  # int(1.5) would silently give 1
        result = kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"config: {key}={value!r} is not {what}") from None
    require(result >= minimum, f"{key} must be >= {minimum} (got {value})")
    return result


def choice(cfg: DictConfig, key: str, known: tuple[str, ...]) -> str:
    """The value at ``key``, one of ``known``.

    Parameters
    ----------
    cfg : DictConfig
        The composed config.
    key : str
        Dotted path of the value.
    known : tuple of str
        The allowed values.
    """
    value = OmegaConf.select(cfg, key)
    require(value in known, f"{key}={value!r} (known: {', '.join(known)})")
    return str(value)


def flag(cfg: DictConfig, key: str) -> bool:
    """The value at ``key``, which must be true or false.

    Parameters
    ----------
    cfg : DictConfig
        The composed config.
    key : str
        Dotted path of the value.
    """
    value = OmegaConf.select(cfg, key)
    require(isinstance(value, bool), f"{key}={value!r} (use true or false)")
    return bool(value)
