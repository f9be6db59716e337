"""SiloFedAvg, discovery and the metered grid, with ClientApps running in this process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Error, Message

from client.app import app as client_app
from fedalign.config import Silo, compose, silos
from fedalign.errors import FederationError
from fedalign.models import build_model, get_weights
from fedalign.protocol import to_config, to_record
from fedalign.runlog import RunRecorder
from fedalign.settings.fedavg import FedAvgSettings
from server.discovery import discover_silos
from server.grid import MeteredGrid
from strategies.fedavg import SiloFedAvg
from strategies.registry import assemble
from tests.conftest import InProcessGrid, silo_config

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = {11: ("mnist", "source"), 12: ("usps", "source"), 13: ("mnistm", "target")}
SILOS = [Silo("mnist", "source"), Silo("usps", "source"), Silo("mnistm", "target")]


def node_configs(cache, nodes=NODES) -> dict[int, dict]:
    return {nid: {"domain": d, "role": r, "data-dir": str(cache)} for nid, (d, r) in nodes.items()}


def train_cfg(cache) -> dict:
    return silo_config(cache, **{"local-steps": 25})


def run_rounds(tmp_path, grid, rounds=2, min_sources=1):
    cfg = compose(["data.domains=[mnist,usps,mnistm]", "wandb.mode=disabled"])
    recorder = RunRecorder(tmp_path / "run", {"name": "t"}, target="mnistm")
    metered = MeteredGrid(grid)
    roster = discover_silos(metered, silos(cfg), timeout=10, data_config={})
    metered.discovery_bytes = metered.bytes_sent
    strategy = assemble(
        SiloFedAvg, FedAvgSettings(min_sources=min_sources), roster, recorder, rounds
    )
    torch.manual_seed(0)
    initial = get_weights(build_model("digit_cnn"))
    strategy.start(
        grid=metered,
        initial_arrays=to_record(initial),
        num_rounds=rounds,
        timeout=60,
        train_config=to_config(train_cfg(grid.nodes[11]["data-dir"])),
        evaluate_config=to_config(train_cfg(grid.nodes[11]["data-dir"])),
    )
    return recorder, metered, strategy.final_arrays, initial


def test_rounds_improve_target_and_write_metrics(tmp_path, digits_cache):
    grid = InProcessGrid(client_app, node_configs(digits_cache))
    recorder, metered, _, _ = run_rounds(tmp_path, grid)
    lines = [
        json.loads(row) for row in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["round"] for row in lines] == [0, 1, 2]
    assert all(row["target_accuracy"] is not None for row in lines)
    assert lines[-1]["target_accuracy"] > lines[0]["target_accuracy"] + 0.1
    assert set(lines[1]["silos"]) == {"mnist", "usps", "mnistm"}
    assert (
        "train-loss" in lines[1]["silos"]["mnist"]
        and "train-loss" not in lines[1]["silos"]["mnistm"]
    )
    assert lines[1]["bytes_sent"] > 0 and lines[1]["bytes_received"] > 0
    assert metered.bytes_sent == sum(row["bytes_sent"] for row in lines) + metered.discovery_bytes
    recorder.finish("completed")
    assert (tmp_path / "run" / "accuracy.png").stat().st_size > 1000


def test_only_weights_and_scalars_cross_the_boundary(tmp_path, digits_cache):
    """Every array in every message is a model weight of the model's own shape."""
    seen: list[tuple[str, str, dict]] = []
    grid = InProcessGrid(client_app, node_configs(digits_cache))
    model_shapes = {k: v.shape for k, v in get_weights(build_model("digit_cnn")).items()}

    def tap(direction: str, message: Message, size: int) -> None:
        if message.has_content():
            for record in message.content.array_records.values():
                seen.append(
                    (
                        direction,
                        message.metadata.message_type,
                        {k: a.numpy().shape for k, a in record.items()},
                    )
                )

    cfg = compose(["data.domains=[mnist,usps,mnistm]"])
    metered = MeteredGrid(grid, taps=[tap])
    roster = discover_silos(metered, silos(cfg), timeout=10, data_config={})
    recorder = RunRecorder(tmp_path / "run", {"name": "t"}, target="mnistm")
    assemble(SiloFedAvg, FedAvgSettings(), roster, recorder, 1).start(
        grid=metered,
        initial_arrays=to_record(get_weights(build_model("digit_cnn"))),
        num_rounds=1,
        train_config=to_config(train_cfg(digits_cache)),
        evaluate_config=to_config(train_cfg(digits_cache)),
    )
    assert {d for d, _, _ in seen} == {"sent", "received"}
    for _, _, shapes in seen:
        assert shapes == model_shapes


def test_error_reply_drops_that_silo_for_the_round(tmp_path, digits_cache, caplog):
    def break_usps_training(message: Message, reply: Message) -> Message:
        if message.metadata.dst_node_id == 12 and message.metadata.message_type == "train":
            return Message(Error(100, "silo usps: disk on fire"), reply_to=message)
        return reply

    grid = InProcessGrid(client_app, node_configs(digits_cache), intercept=break_usps_training)
    with caplog.at_level("WARNING", logger="fedalign.strategy"):
        _, _, result, initial = run_rounds(tmp_path, grid, rounds=1)
    assert "dropped reply from usps: silo usps: disk on fire" in caplog.text
    final = {k: a.numpy() for k, a in result.items()}
    assert any(not np.allclose(final[k], initial[k]) for k in final)  # mnist still trained


def test_too_few_sources_keeps_the_global_model(tmp_path, digits_cache):
    def break_all_training(message: Message, reply: Message) -> Message:
        if message.metadata.message_type == "train":
            return Message(Error(100, "broken"), reply_to=message)
        return reply

    grid = InProcessGrid(client_app, node_configs(digits_cache), intercept=break_all_training)
    _, _, result, initial = run_rounds(tmp_path, grid, rounds=1)
    final = {k: a.numpy() for k, a in result.items()}
    assert all(np.array_equal(final[k], initial[k]) for k in initial)


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        (
            {11: ("mnist", "source"), 12: ("mnist", "source"), 13: ("mnistm", "target")},
            "two silos serve domain 'mnist'",
        ),
        (
            {11: ("mnist", "target"), 12: ("usps", "source"), 13: ("mnistm", "target")},
            "silo 'mnist' says role='target' but the run expects role='source'",
        ),
        (
            {11: ("mnist", "source"), 12: ("syn", "source"), 13: ("mnistm", "target")},
            "serves domain 'syn', which this run does not use",
        ),
        (
            {11: ("mnist", "source"), 12: ("usps", "source"), 13: ("mnistm", "nobody")},
            "role='nobody' is unknown",
        ),
    ],
)
def test_discovery_rejects_inconsistent_silos(digits_cache, nodes, expected):
    grid = InProcessGrid(client_app, node_configs(digits_cache, nodes))
    with pytest.raises(FederationError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        discover_silos(MeteredGrid(grid), SILOS, timeout=10, data_config={})


def test_discovery_times_out_with_one_line(digits_cache):
    two = {11: ("mnist", "source"), 13: ("mnistm", "target")}
    grid = InProcessGrid(client_app, node_configs(digits_cache, two))
    with pytest.raises(FederationError, match=r"only 2/3 silos connected within 1s"):
        discover_silos(grid, SILOS, timeout=1, data_config={})
