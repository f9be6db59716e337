"""Hydra composition, validation, and the one-line errors of the ``fedalign`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.run import prevalidate
from fedalign.config import ConfigError, compose, from_json, silos, to_json, validate

FEDALIGN = str(Path(sys.executable).parent / "fedalign")


def test_default_config_is_the_embedded_benchmark():
    cfg = compose()
    validate(cfg)
    assert list(cfg.data.domains) == ["mnist", "mnistm", "syn", "usps", "svhn"]
    assert cfg.data.target == "mnistm"
    assert cfg.strategy.name == "fedavg" and cfg.model.name == "digit_cnn"
    assert cfg.federation.mode == "deployment"
    roles = {s.domain: s.role for s in silos(cfg)}
    assert roles == {
        "mnist": "source",
        "mnistm": "target",
        "syn": "source",
        "usps": "source",
        "svhn": "source",
    }
    assert cfg.name == "fedavg-mnistm"


def test_overrides_and_groups_compose():
    cfg = compose(["data.target=svhn", "rounds=3", "model=resnet18", "federation=simulation"])
    validate(cfg)
    assert cfg.data.target == "svhn" and cfg.rounds == 3
    assert cfg.model.name == "resnet18" and cfg.federation.mode == "simulation"
    assert [s.domain for s in silos(cfg) if s.role == "target"] == ["svhn"]


def test_json_round_trip_is_what_the_server_app_receives():
    cfg = compose(["seed=7"])
    back = from_json(to_json(cfg))
    assert back.seed == 7 and back.name == "fedavg-mnistm"
    assert "${" not in to_json(cfg)  # interpolations are resolved before shipping


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["foo=1"], "unknown key 'foo'"),
        (["train.lrr=0.1"], "unknown key 'train.lrr'"),
        (["strategy=bogus"], "options in 'strategy': fedavg"),
        (["data.target=kmnist"], "data.target='kmnist' is not one of data.domains"),
        (["train.lr=fast"], "train.lr='fast' is not a number"),
        (["seed=1.5"], "seed=1.5 is not an integer"),
        (["data.source=imagenet"], "data.source='imagenet' (known: digit_five, digits5, imagef"),
        (["rounds=0"], "rounds must be >= 1"),
        (["train.optimizer=lbfgs"], "train.optimizer='lbfgs' (known: adam, sgd)"),
        (["device=tpu"], "device='tpu'"),
        (["data.domains=[mnist,mnist,usps]", "data.target=usps"], "duplicates"),
        (["strategy.min_sources=9"], "only 4 source silos"),
    ],
)
def test_bad_config_is_one_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides))
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_multirun_sweeps_are_validated_job_by_job():
    prevalidate(["-m", "seed=0,1", "rounds=1,2"])
    with pytest.raises(ConfigError, match="options in 'strategy'"):
        prevalidate(["--multirun", "strategy=fedavg,bogus"])
    with pytest.raises(ConfigError, match="rounds must be >= 1"):
        prevalidate(["-m", "rounds=2,0"])


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["run", "foo=1"], 2, "error: config: unknown key 'foo'"),
        (["run", "-m", "strategy=fedavg,nope"], 2, "options in 'strategy'"),
        (["launch"], 2, "unknown command 'launch'"),
    ],
)
def test_cli_errors_are_one_line_with_nonzero_exit(args, code, expected):
    done = subprocess.run([FEDALIGN, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == code
    assert expected in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr


def test_cli_unknown_domain_fails_before_starting_anything(tmp_path):
    args = [
        "run",
        "data.domains=[mnist,kmnist,mnistm]",
        f"data.cache_dir={tmp_path}",
        f"output.root={tmp_path}",
    ]
    done = subprocess.run([FEDALIGN, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "unknown domain 'kmnist'" in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "SuperLink" not in done.stdout


def test_overrides_reach_the_job_config():
    done = subprocess.run(
        [FEDALIGN, "run", "seed=3", "data.target=usps", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "seed: 3" in done.stdout and "target: usps" in done.stdout


MULTIRUN = """
import json, sys
import cli.run, server.launcher

def launch(cfg, run_dir, echo=print):  # stands in for the federation: tests/test_e2e.py runs one
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "launched.json").write_text(json.dumps({"seed": cfg.seed, "rounds": cfg.rounds}))
    return {"final_target_accuracy": 0.5}

server.launcher.launch = launch
cli.run.print_results = lambda run_dir, console: None
from cli.main import main
main(sys.argv[1:])
"""


def test_a_multirun_sweep_launches_one_federation_per_job(tmp_path, digits_cache):
    args = ["run", "-m", "seed=0,1", "rounds=1", "data.domains=[mnist,usps,mnistm]"]
    args += [f"data.cache_dir={digits_cache}", f"output.root={tmp_path}", "wandb.mode=disabled"]
    done = subprocess.run(
        [sys.executable, "-c", MULTIRUN, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = sorted((tmp_path / "multirun").glob("*/*/launched.json"))
    launched = sorted((json.loads(p.read_text())["seed"], p.parent.name) for p in jobs)
    assert launched == [(0, "0-fedavg-mnistm"), (1, "1-fedavg-mnistm")]  # a run folder per job


def test_hydra_usage_errors_are_one_line():
    done = subprocess.run(
        [FEDALIGN, "run", "-m", "seed=3,4", "--cfg", "job"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: hydra: Only one of")
    assert done.stderr.strip().count("\n") == 0, done.stderr
