"""Hydra configuration: compose, validate, and ship a resolved config to the Flower apps.

How a composed config reaches the apps: the launcher (``fedalign run``) composes
``conf/config.yaml`` with the user's overrides, validates it, resolves it to JSON and passes
that JSON to the ServerApp as the single run-config key ``config-json``. The ServerApp sends
each silo only what it needs (training hyper-parameters, model name) inside its messages.
Silos read their own identity (domain, role, data folder) from their SuperNode's node-config.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedalign.errors import FedalignError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
ROLES = ("source", "target")
FEDERATION_MODES = ("deployment", "simulation")
WANDB_MODES = ("auto", "online", "offline", "disabled")


class ConfigError(FedalignError, ValueError):
    """A configuration problem, described in one line that says what to do."""


@dataclass(frozen=True)
class Silo:
    """One domain silo of a run: a SuperNode holding one domain's data."""

    domain: str
    role: str


def hydra_error_line(exc: BaseException) -> str:
    """Collapse a multi-line Hydra/OmegaConf error into one actionable line."""
    text = str(exc).strip()
    head = text.splitlines()[0] if text else type(exc).__name__
    group = re.search(r"Available options in '([^']+)':\n((?:\t.*\n?)*)", text)
    if group:
        options = ", ".join(o.strip() for o in group.group(2).splitlines() if o.strip())
        return f"config: {head} (options in '{group.group(1)}': {options})"
    key = re.match(r"Could not override '([^']+)'", head)
    if key:
        name = key.group(1)
        return f"config: unknown key '{name}' (not in conf/); fix it, or add one with +{name}="
    return f"config: {head}"


def compose(overrides: list[str] | None = None, conf_dir: Path = CONF_DIR) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides; errors become :class:`ConfigError`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not (conf_dir / "config.yaml").is_file():
        raise ConfigError(f"config: {conf_dir}/config.yaml not found; run from a fedalign checkout")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    except Exception as exc:  # Hydra raises many exception types; all are config errors here
        raise ConfigError(hydra_error_line(exc)) from exc
    finally:
        GlobalHydra.instance().clear()
    return cfg


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(f"config: {message}")


def _number(cfg: DictConfig, key: str, kind: type = int, minimum: float = 1) -> float:
    value = OmegaConf.select(cfg, key)
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise TypeError  # int(1.5) would silently give 1
        number = kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"config: {key}={value!r} is not {what}") from None
    _require(number >= minimum, f"{key} must be >= {minimum} (got {value})")
    return number


def _choice(cfg: DictConfig, key: str, known: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    _require(value in known, f"{key}={value!r} (known: {', '.join(known)})")


def _validate_external(cfg: DictConfig) -> None:
    """Silos that join from elsewhere must be configured silos of a deployment."""
    external = list(OmegaConf.select(cfg, "federation.external_silos", default=[]) or [])
    unknown = [d for d in external if d not in cfg.data.domains]
    _require(
        not unknown,
        f"federation.external_silos has {unknown}, not in data.domains={list(cfg.data.domains)}",
    )
    _require(
        not external or cfg.federation.mode == "deployment",
        "federation.external_silos applies to a deployment (federation=local)",
    )


def _validate_fedka_blocks(cfg: DictConfig) -> None:
    """FedKA's disentangler and class-aware alignment (``strategy.disentangle``/``class_align``)."""
    for block in ("disentangle", "class_align"):
        enabled = OmegaConf.select(cfg, f"strategy.{block}.enabled")
        _require(
            isinstance(enabled, bool), f"strategy.{block}.enabled={enabled!r} (use true or false)"
        )
        _number(cfg, f"strategy.{block}.weight", float, minimum=0)
    _choice(cfg, "strategy.disentangle.schedule", ("alpha", "constant"))
    _number(cfg, "strategy.disentangle.hidden")
    _number(cfg, "strategy.class_align.min_count", minimum=2)


def external_silos(cfg: DictConfig) -> set[str]:
    """Domains whose SuperNodes the launcher does not start (they join themselves)."""
    return set(OmegaConf.select(cfg, "federation.external_silos", default=[]) or [])


def _validate_security(cfg: DictConfig) -> None:
    """TLS and SuperNode authentication apply to a deployment; authentication needs TLS."""
    tls = bool(OmegaConf.select(cfg, "federation.tls", default=False))
    auth = bool(OmegaConf.select(cfg, "federation.auth", default=False))
    _require(not auth or tls, "federation.auth=true needs federation.tls=true")
    _require(
        not tls or cfg.federation.mode == "deployment",
        "federation.tls applies to a deployment (federation=local), not to the simulation",
    )


def _validate_silo_runtime(cfg: DictConfig) -> None:
    """``federation.silo_runtime`` (deployments only): warm silo runtimes on or off."""
    warm = OmegaConf.select(cfg, "federation.silo_runtime", default=None)
    _require(
        warm is None or isinstance(warm, bool),
        f"federation.silo_runtime={warm!r} (use true or false)",
    )


def _validate_polling(cfg: DictConfig) -> None:
    """Reply polling of the ServerApp and task polling of Flower's executors (seconds)."""
    low = OmegaConf.select(cfg, "federation.reply_poll_min", default=None)
    high = OmegaConf.select(cfg, "federation.reply_poll_max", default=None)
    if low is not None and high is not None:
        _number(cfg, "federation.reply_poll_min", float, minimum=0.001)
        _number(cfg, "federation.reply_poll_max", float, minimum=float(low))
    if OmegaConf.select(cfg, "federation.max_in_flight", default=None) is not None:
        _number(cfg, "federation.max_in_flight", minimum=0)
    if OmegaConf.select(cfg, "federation.superexec_poll", default=None) is not None:
        poll = _number(cfg, "federation.superexec_poll", float, minimum=0.01)
        _require(poll <= 60, f"federation.superexec_poll={poll} must be in [0.01, 60] (Flower)")


def _validate_updates(cfg: DictConfig) -> None:
    """``updates``: the norm bound and the robust aggregator, and that it fits the strategy."""
    if OmegaConf.select(cfg, "updates.max_norm") is not None:
        _number(cfg, "updates.max_norm", float, minimum=1e-12)
    _choice(cfg, "updates.robust", ("none", "median", "trimmed_mean", "krum"))
    beta = _number(cfg, "updates.trim_beta", float, minimum=0)
    _require(beta < 0.5, f"updates.trim_beta={beta} must be in [0, 0.5)")
    _number(cfg, "updates.num_malicious", minimum=0)
    fisher = (
        cfg.strategy.name == "fisher" or OmegaConf.select(cfg, "strategy.aggregation") == "fisher"
    )
    _require(
        cfg.updates.robust == "none" or not fisher,
        f"updates.robust={cfg.updates.robust} replaces a weighted average, but strategy "
        f"{cfg.strategy.name} merges by Fisher; use updates.robust=none with it",
    )


def validate(cfg: DictConfig) -> None:
    """Semantic checks Hydra cannot do; raises :class:`ConfigError` with one line."""
    from fedalign.models import MODELS

    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:
        raise ConfigError(hydra_error_line(exc)) from exc
    domains = list(cfg.data.domains)
    _require(len(domains) == len(set(domains)), f"data.domains has duplicates: {domains}")
    _require(
        cfg.data.target in domains,
        f"data.target={cfg.data.target!r} is not one of data.domains={domains}",
    )
    _require(len(domains) >= 2, "data.domains needs the target and at least one source domain")
    for key in ("rounds", "train.local_steps", "train.batch_size", "eval.batch_size"):
        _number(cfg, key)
    _number(cfg, "seed", minimum=0)
    _number(cfg, "data.seed", minimum=0)
    from fedalign.data.sources import source_names

    _choice(cfg, "data.source", source_names())
    _number(cfg, "train.lr", float, minimum=1e-12)
    _number(cfg, "train.weight_decay", float, minimum=0)
    shards = int(_number(cfg, "data.shards")) if "shards" in cfg.data else 1
    _require(
        shards == 1 or not OmegaConf.select(cfg, "federation.external_silos", default=[]),
        "data.shards > 1 makes silos on this machine; it does not combine with "
        "federation.external_silos",
    )
    _number(cfg, "strategy.min_sources")
    sources = (len(domains) - 1) * shards
    _require(
        int(cfg.strategy.min_sources) <= sources,
        f"strategy.min_sources={cfg.strategy.min_sources} but there are only "
        f"{sources} source silos",
    )
    _choice(cfg, "train.optimizer", ("adam", "sgd"))
    _choice(cfg, "federation.mode", FEDERATION_MODES)
    _choice(cfg, "wandb.mode", WANDB_MODES)
    _choice(cfg, "model.name", tuple(sorted(MODELS)))
    _validate_updates(cfg)
    _validate_polling(cfg)
    _validate_security(cfg)
    _validate_silo_runtime(cfg)
    _validate_external(cfg)
    if "vote" in cfg.strategy:  # FedKA / FedVote settings
        _choice(cfg, "strategy.start_from", ("finetuned", "averaged"))
        _choice(cfg, "strategy.aggregation", ("fedavg", "fisher"))
        _choice(cfg, "strategy.embed_transport", ("float32", "float16"))
        for key in ("vote_samples", "embed_samples", "kernel_num"):
            _number(cfg, f"strategy.{key}")
        _number(cfg, "strategy.finetune_steps", minimum=0)
        _number(cfg, "strategy.mmd_weight", float, minimum=0)
        _number(cfg, "strategy.kernel_mul", float, minimum=1e-9)
        agreement = _number(cfg, "strategy.min_agreement", float, minimum=0)
        _require(agreement <= 1, f"strategy.min_agreement={agreement} must be in [0, 1]")
        _validate_fedka_blocks(cfg)
    if "proximal_mu" in cfg.strategy:
        _number(cfg, "strategy.proximal_mu", float, minimum=0)
    if "fisher" in cfg.strategy:
        _choice(cfg, "strategy.fisher.mode", ("exact", "empirical", "sampled"))
        _choice(cfg, "strategy.fisher.weighting", ("examples", "uniform"))
        _choice(cfg, "strategy.fisher.transport", ("float32", "float16"))
        _number(cfg, "strategy.fisher.samples")
        _number(cfg, "strategy.fisher.floor", float, minimum=1e-30)
    device = str(cfg.device)
    _require(
        device in ("auto", "cpu") or device.startswith("cuda"),
        f"device={device!r} (use auto, cpu, cuda or cuda:N)",
    )


def shard_name(domain: str, index: int) -> str:
    """The silo holding part ``index`` of ``domain``'s training data (``data.shards`` > 1)."""
    return f"{domain}.{index}"


def parse_shard(silo: str) -> tuple[str, int | None]:
    """``"mnist.3"`` -> ``("mnist", 3)``; a whole-domain silo ``"mnist"`` -> ``("mnist", None)``."""
    domain, _, index = silo.rpartition(".")
    return (domain, int(index)) if domain and index.isdigit() else (silo, None)


def silos(cfg: DictConfig | dict[str, Any]) -> list[Silo]:
    """The run's silos: one per domain, the target domain's silo has role ``target``.

    With ``data.shards`` = S > 1 every source domain is split among S silos (``<domain>.<i>``,
    each with 1/S of its training data) for scale experiments; the target silo stays whole.
    """
    data = cfg["data"]
    shards = int(data.get("shards", 1) or 1)
    result = []
    for domain in data["domains"]:
        if domain == data["target"]:
            result.append(Silo(domain=domain, role="target"))
        elif shards == 1:
            result.append(Silo(domain=domain, role="source"))
        else:
            result += [Silo(shard_name(domain, i), "source") for i in range(shards)]
    return result


def to_json(cfg: DictConfig) -> str:
    """The resolved config as compact JSON (what crosses into the ServerApp)."""
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), separators=(",", ":"))


def from_json(text: str) -> DictConfig:
    """Inverse of :func:`to_json`."""
    try:
        return OmegaConf.create(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config: run-config 'config-json' is not valid JSON ({exc})") from exc
