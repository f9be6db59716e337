"""Baselines in the same harness: FedProx (proximal term) and FedBN (silo-local BatchNorm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from client.app import app as client_app
from fedalign.config import compose, silos
from fedalign.models import DigitCNN, batchnorm_names, get_weights
from fedalign.protocol import ARRAYS, CONFIG, from_record, to_config, to_record
from fedalign.runlog import RunRecorder
from fedalign.settings.fedbn import FedBNSettings
from fedalign.settings.fedprox import FedProxSettings
from fedalign.train import TrainConfig, train_local
from server.discovery import discover_silos
from server.grid import MeteredGrid
from strategies.fedavg import SiloFedAvg
from strategies.registry import assemble, build_strategy
from tests.conftest import InProcessGrid, make_context, silo_config

pytestmark = pytest.mark.usefixtures("task_identity")


def drift(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(sum(np.square(a[k] - b[k]).sum() for k in a))


def test_proximal_term_keeps_local_weights_near_the_start():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (128, 3, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 128)
    cfg = TrainConfig(local_steps=20, lr=1e-2, log_every=0)
    drifts = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        model = DigitCNN()
        start = get_weights(model)
        train_local(model, x, y, cfg, torch.device("cpu"), proximal_mu=mu)
        drifts[mu] = drift(get_weights(model), start)
    assert drifts[10.0] < 0.5 * drifts[0.0]


def train_reply(context, weights, cache, **extra) -> dict[str, np.ndarray]:
    content = RecordDict(
        {ARRAYS: to_record(weights), CONFIG: ConfigRecord(silo_config(cache, **extra))}
    )
    reply = client_app(Message(content, 5, "train"), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return from_record(reply.content[ARRAYS])


def test_fedbn_silo_keeps_its_own_batchnorm_across_rounds(digits_cache):
    torch.manual_seed(0)
    model = DigitCNN()
    names = batchnorm_names(model)
    context = make_context(5, {"domain": "mnist", "role": "source"})
    first = train_reply(context, get_weights(model), digits_cache, **{"local-batchnorm": True})
    stored = from_record(context.state["local-batchnorm"])
    assert set(stored) == {n for n in names if not n.endswith("num_batches_tracked")}
    # Round 2's global model carries nonsense BatchNorm statistics: the silo must ignore them.
    poisoned = {k: (np.full_like(v, 100.0) if k in names else v) for k, v in first.items()}
    second = train_reply(
        context, poisoned, digits_cache, **{"local-batchnorm": True, "server-round": 2}
    )
    assert np.abs(second["encoder.1.running_var"] - 100.0).min() > 50
    without = train_reply(
        make_context(6, {"domain": "mnist", "role": "source"}), poisoned, digits_cache
    )
    # A plain FedAvg silo starts from the poisoned statistics and still carries them (0.9^15).
    assert without["encoder.1.running_var"].min() > second["encoder.1.running_var"].max() + 10


def run_one_round(tmp_path, cache, settings) -> list[dict]:
    nodes = {
        11: {"domain": "mnist", "role": "source", "data-dir": str(cache)},
        13: {"domain": "mnistm", "role": "target", "data-dir": str(cache)},
    }
    configs = []

    def tap(direction, message, size):
        if direction == "sent" and message.metadata.message_type == "train":
            configs.append(dict(message.content[CONFIG]))

    grid = MeteredGrid(InProcessGrid(client_app, nodes), taps=[tap])
    cfg = compose(["data.domains=[mnist,mnistm]"])
    roster = discover_silos(grid, silos(cfg), timeout=10, data_config={})
    recorder = RunRecorder(tmp_path / "run", {"name": "t"}, target="mnistm")
    strategy = assemble(SiloFedAvg, settings, roster, recorder, 1)
    train = to_config(silo_config(cache, **{"local-steps": 5}))
    torch.manual_seed(0)
    strategy.start(grid, to_record(get_weights(DigitCNN())), 1, 60, train, train)
    return configs


def test_strategies_tell_the_sources_what_to_do(tmp_path, digits_cache):
    prox = run_one_round(tmp_path / "p", digits_cache, FedProxSettings(proximal_mu=0.5))
    assert prox[0]["proximal-mu"] == 0.5
    bn = run_one_round(tmp_path / "b", digits_cache, FedBNSettings())
    assert bn[0]["local-batchnorm"] is True


@pytest.mark.parametrize(("name", "kind"), [("fedprox", FedProxSettings), ("fedbn", FedBNSettings)])
def test_registry_builds_the_baselines(tmp_path, name, kind):
    cfg = compose([f"strategy={name}"])
    roster = {1: silos(cfg)[0]}
    strategy = build_strategy(cfg, roster, RunRecorder(tmp_path, {}, "mnistm"))
    assert type(strategy) is SiloFedAvg and isinstance(strategy.settings, kind)
