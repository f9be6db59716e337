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

from fedalign.errors import ConfigError
from fedalign.settings.catalog import strategy_settings
from fedalign.settings.checks import choice, number, require
from fedalign.settings.model import MODEL_NAMES
from fedalign.settings.train import OPTIMIZERS
from fedalign.settings.tta import TTASettings
from fedalign.settings.updates import UpdateSettings

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
ROLES = ("source", "target")
FEDERATION_MODES = ("deployment", "simulation")
WANDB_MODES = ("auto", "online", "offline", "disabled")
# Keys of a run's config that do not change what it learns: where and how it runs (ports,
# engine, timeouts), where it writes, how it logs, its name. A resumed run may change them, and
# a grid cell that differs only in them is current.
RUN_LOCAL_KEYS = ("federation", "output", "wandb", "verbose", "device", "resume", "name")


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


def _validate_external(cfg: DictConfig) -> None:
    """Silos that join from elsewhere must be configured silos of a deployment."""
    external = list(OmegaConf.select(cfg, "federation.external_silos", default=[]) or [])
    unknown = [d for d in external if d not in cfg.data.domains]
    require(
        not unknown,
        f"federation.external_silos has {unknown}, not in data.domains={list(cfg.data.domains)}",
    )
    require(
        not external or cfg.federation.mode == "deployment",
        "federation.external_silos applies to a deployment (federation=local)",
    )


def external_silos(cfg: DictConfig) -> set[str]:
    """Domains whose SuperNodes the launcher does not start (they join themselves)."""
    return set(OmegaConf.select(cfg, "federation.external_silos", default=[]) or [])


def _validate_security(cfg: DictConfig) -> None:
    """TLS and SuperNode authentication apply to a deployment; authentication needs TLS."""
    tls = bool(OmegaConf.select(cfg, "federation.tls", default=False))
    auth = bool(OmegaConf.select(cfg, "federation.auth", default=False))
    require(not auth or tls, "federation.auth=true needs federation.tls=true")
    require(
        not tls or cfg.federation.mode == "deployment",
        "federation.tls applies to a deployment (federation=local), not to the simulation",
    )


def _validate_silo_runtime(cfg: DictConfig) -> None:
    """``federation.silo_runtime`` (deployments only): warm silo runtimes on or off."""
    warm = OmegaConf.select(cfg, "federation.silo_runtime", default=None)
    require(
        warm is None or isinstance(warm, bool),
        f"federation.silo_runtime={warm!r} (use true or false)",
    )


def _validate_polling(cfg: DictConfig) -> None:
    """Reply polling of the ServerApp and task polling of Flower's executors (seconds)."""
    low = OmegaConf.select(cfg, "federation.reply_poll_min", default=None)
    high = OmegaConf.select(cfg, "federation.reply_poll_max", default=None)
    if low is not None and high is not None:
        number(cfg, "federation.reply_poll_min", float, minimum=0.001)
        number(cfg, "federation.reply_poll_max", float, minimum=float(low))
    if OmegaConf.select(cfg, "federation.max_in_flight", default=None) is not None:
        number(cfg, "federation.max_in_flight", minimum=0)
    if OmegaConf.select(cfg, "federation.superexec_poll", default=None) is not None:
        poll = number(cfg, "federation.superexec_poll", float, minimum=0.01)
        require(poll <= 60, f"federation.superexec_poll={poll} must be in [0.01, 60] (Flower)")


def validate(cfg: DictConfig) -> None:
    """Semantic checks Hydra cannot do; raises :class:`ConfigError` with one line."""
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:
        raise ConfigError(hydra_error_line(exc)) from exc
    domains = list(cfg.data.domains)
    require(len(domains) == len(set(domains)), f"data.domains has duplicates: {domains}")
    require(
        cfg.data.target in domains,
        f"data.target={cfg.data.target!r} is not one of data.domains={domains}",
    )
    require(len(domains) >= 2, "data.domains needs the target and at least one source domain")
    for key in ("rounds", "train.local_steps", "train.batch_size", "eval.batch_size"):
        number(cfg, key)
    number(cfg, "seed", minimum=0)
    number(cfg, "data.seed", minimum=0)
    from fedalign.data.sources import source_names

    choice(cfg, "data.source", source_names())
    number(cfg, "train.lr", float, minimum=1e-12)
    number(cfg, "train.weight_decay", float, minimum=0)
    shards = int(number(cfg, "data.shards")) if "shards" in cfg.data else 1
    require(
        shards == 1 or not OmegaConf.select(cfg, "federation.external_silos", default=[]),
        "data.shards > 1 makes silos on this machine; it does not combine with "
        "federation.external_silos",
    )
    strategy = strategy_settings(cfg)  # the name first: a wrong one stops here
    sources = (len(domains) - 1) * shards
    require(
        int(cfg.strategy.min_sources) <= sources,
        f"strategy.min_sources={cfg.strategy.min_sources} but there are only "
        f"{sources} source silos",
    )
    choice(cfg, "train.optimizer", OPTIMIZERS)
    choice(cfg, "federation.mode", FEDERATION_MODES)
    choice(cfg, "wandb.mode", WANDB_MODES)
    choice(cfg, "model.name", MODEL_NAMES)
    UpdateSettings.from_config(cfg, strategy.merges_by_fisher)
    TTASettings.from_config(cfg)
    _validate_polling(cfg)
    _validate_security(cfg)
    _validate_silo_runtime(cfg)
    _validate_external(cfg)
    device = str(cfg.device)
    require(
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


def learning_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a resolved container) without the keys that only say where and how a run
    ran (``RUN_LOCAL_KEYS``).

    Parameters
    ----------
    config : dict
        A run's config as plain containers.
    """
    return {k: v for k, v in config.items() if k not in RUN_LOCAL_KEYS}


def to_json(cfg: DictConfig) -> str:
    """The resolved config as compact JSON (what crosses into the ServerApp)."""
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), separators=(",", ":"))


def from_json(text: str) -> DictConfig:
    """Inverse of :func:`to_json`."""
    try:
        return OmegaConf.create(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config: run-config 'config-json' is not valid JSON ({exc})") from exc
