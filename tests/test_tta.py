"""Test-time adaptation at the target silo: LAME and AdaBN against direct computations, the
settings, the target's reply, the run record and the results rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType, RecordDict
from torch import nn

from client.app import app as client_app
from fedalign.config import ConfigError, compose, silos, validate
from fedalign.models import build_model, get_weights
from fedalign.protocol import ARRAYS, CONFIG, METRICS, to_config, to_record
from fedalign.results import accuracy_table, collect, write_results
from fedalign.runlog import RunRecorder
from fedalign.settings.fedavg import FedAvgSettings
from fedalign.settings.fedka import DisentangleSettings, FedKASettings
from fedalign.settings.tta import TTASettings, line_key, metric_key
from fedalign.train import to_input
from fedalign.tta import adabn, affinity_matrix, lame, lame_predict
from server.discovery import discover_silos
from server.grid import MeteredGrid
from strategies.fedavg import SiloFedAvg
from strategies.fedka import FedKA
from strategies.registry import assemble
from tests.conftest import InProcessGrid, silo_config

TTA_ON = TTASettings(methods=("lame", "adabn"))
NODES = {11: ("mnist", "source"), 12: ("usps", "source"), 13: ("mnistm", "target")}


# LAME against a direct implementation ---------------------------------------------------------
def direct_affinity(features: np.ndarray, kind: str, knn: int) -> np.ndarray:
    """The affinity with loops: L2-normalise, Euclidean distances, then kNN or RBF."""
    n = len(features)
    unit = [row / math.sqrt(sum(v * v for v in row)) for row in features]
    dist = [[math.dist(unit[i], unit[j]) for j in range(n)] for i in range(n)]
    w = np.zeros((n, n))
    if kind == "knn":
        for i in range(n):
            others = sorted((dist[i][j], j) for j in range(n) if j != i)
            for _, j in others[:knn]:
                w[i, j] = 1.0
        return w
    sigma = sum(sorted(dist[i])[knn - 1] for i in range(n)) / n  # k-th smallest, self counted
    for i in range(n):
        for j in range(n):
            w[i, j] = math.exp(-(dist[i][j] ** 2) / (2 * sigma**2))
    return w


def direct_lame(p: np.ndarray, w: np.ndarray, max_steps: int) -> tuple[np.ndarray, int]:
    """The bound optimisation with loops: z_ik <- exp(log p_ik + sum_j w_ij z_jk) / norm, from
    z = p, stopping when the energy changes by <= 1e-8 of itself (from the third update)."""
    n, k = p.shape
    log_p = [[math.log(p[i, c] + 1e-10) for c in range(k)] for i in range(n)]
    z = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in log_p]
    previous, steps = math.inf, 0
    for step in range(max_steps):
        pair = [[sum(w[i, j] * z[j][c] for j in range(n)) for c in range(k)] for i in range(n)]
        z = []
        for i in range(n):
            exps = [math.exp(log_p[i][c] + pair[i][c]) for c in range(k)]
            z.append([e / sum(exps) for e in exps])
        energy = sum(
            z[i][c] * (math.log(max(z[i][c], 1e-20)) - log_p[i][c] - pair[i][c])
            for i in range(n)
            for c in range(k)
        )
        steps = step + 1
        if step > 1 and abs(energy - previous) <= 1e-8 * abs(previous):
            break
        previous = energy
    return np.array(z), steps


def two_clusters() -> tuple[np.ndarray, np.ndarray]:
    """Features of two tight clusters and predictions where one point of the first cluster
    leans (weakly) to the second cluster's class: LAME should pull it back."""
    rng = np.random.default_rng(3)
    centres = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    first = centres[0] + 0.05 * rng.normal(size=(5, 3))
    features = np.concatenate([first, centres[1] + 0.05 * rng.normal(size=(4, 3))])
    p = np.concatenate([np.tile([0.7, 0.2, 0.1], (5, 1)), np.tile([0.15, 0.75, 0.1], (4, 1))])
    p[2] = [0.4, 0.45, 0.15]
    return features, p + 0.01 * rng.random(p.shape)


@pytest.mark.parametrize("kind", ["knn", "rbf"])
def test_the_affinity_matches_a_direct_computation(kind):
    features, _ = two_clusters()
    np.testing.assert_allclose(
        affinity_matrix(features, kind, 3), direct_affinity(features, kind, 3), atol=1e-12
    )


@pytest.mark.parametrize(
    ("kind", "knn", "max_steps"), [("knn", 3, 100), ("knn", 2, 1), ("rbf", 5, 100)]
)
def test_lame_matches_a_direct_implementation_of_its_update(kind, knn, max_steps):
    features, p = two_clusters()
    p = p / p.sum(1, keepdims=True)
    expected, steps = direct_lame(p, direct_affinity(features, kind, knn), max_steps)
    got = lame(p, affinity_matrix(features, kind, knn), max_steps)
    np.testing.assert_allclose(got, expected, atol=1e-10)
    assert steps <= max_steps and (max_steps == 1 or steps > 2)  # it ran, and stopped by its rule


def test_lame_pulls_a_point_to_its_neighbours_class():
    features, p = two_clusters()
    p = p / p.sum(1, keepdims=True)
    assert p.argmax(1)[2] == 1
    z = lame(p, affinity_matrix(features, "knn", 3))
    assert list(z.argmax(1)) == [0] * 5 + [1] * 4
    np.testing.assert_allclose(z.sum(1), 1.0)


def test_lame_predict_adapts_each_batch_of_the_model_outputs():
    torch.manual_seed(0)
    model = build_model("digit_cnn").eval()
    x = np.random.default_rng(0).integers(0, 256, size=(10, 3, 28, 28), dtype=np.uint8)
    labels = lame_predict(model, x, torch.device("cpu"), "knn", 3, 100, batch_size=5)
    with torch.no_grad():
        features = model.features(to_input(x, torch.device("cpu")))
        probs = model.classify(features).softmax(1).double().numpy()
    expected = []
    for batch in (slice(0, 5), slice(5, 10)):
        w = direct_affinity(features.double().numpy()[batch], "knn", 3)
        expected += list(direct_lame(probs[batch], w, 100)[0].argmax(1))
    assert list(labels) == expected


# AdaBN against the batch statistics -----------------------------------------------------------
def batch_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, unbiased and biased variance per channel of a layer's input."""
    dims = [0, 2, 3] if h.ndim == 4 else [0]
    return h.mean(dims), h.var(dims, unbiased=True), h.var(dims, unbiased=False)


def normalised(h: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    mean, _, biased = batch_stats(h)
    shape = (1, -1, 1, 1) if h.ndim == 4 else (1, -1)
    scaled = (h - mean.view(shape)) / torch.sqrt(biased.view(shape) + bn.eps)
    return scaled * bn.weight.view(shape) + bn.bias.view(shape)


@torch.no_grad()
def direct_digit_cnn_stats(model: nn.Module, x: np.ndarray) -> list[tuple[torch.Tensor, ...]]:
    """The (mean, unbiased variance) of each BatchNorm's input on one batch, layer by layer,
    normalising with the batch's own statistics and with dropout off."""
    enc, head = model.encoder, model.head
    h1 = enc[0](to_input(x, torch.device("cpu")))
    h2 = enc[4](torch.relu(nn.functional.max_pool2d(normalised(h1, enc[1]), 2)))
    f = torch.relu(nn.functional.max_pool2d(normalised(h2, enc[5]), 2)).flatten(1)
    h3 = head[0](f)
    return [batch_stats(h)[:2] for h in (h1, h2, h3)]


def test_adabn_statistics_are_the_target_batch_statistics():
    torch.manual_seed(0)
    model = build_model("digit_cnn")
    before = {k: v.copy() for k, v in get_weights(model).items()}
    x = np.random.default_rng(1).integers(0, 256, size=(64, 3, 28, 28), dtype=np.uint8)
    adapted = adabn(model, x, torch.device("cpu"), batch_size=64)
    layers = [adapted.encoder[1], adapted.encoder[5], adapted.head[1]]
    for layer, (mean, var) in zip(layers, direct_digit_cnn_stats(model, x), strict=True):
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-4, atol=1e-5)
        assert layer.momentum == 0.1 and not layer.training
    assert not adapted.training
    after = get_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the model is untouched


def test_adabn_averages_the_statistics_of_its_batches():
    torch.manual_seed(0)
    model = build_model("digit_cnn")
    x = np.random.default_rng(2).integers(0, 256, size=(40, 3, 28, 28), dtype=np.uint8)
    adapted = adabn(model, x, torch.device("cpu"), batch_size=20)
    halves = [direct_digit_cnn_stats(model, x[:20])[0], direct_digit_cnn_stats(model, x[20:])[0]]
    bn = adapted.encoder[1]
    torch.testing.assert_close(bn.running_mean, (halves[0][0] + halves[1][0]) / 2)
    torch.testing.assert_close(bn.running_var, (halves[0][1] + halves[1][1]) / 2)
    with pytest.raises(ValueError, match="at least 2"):
        adabn(model, x[:1], torch.device("cpu"))


# Settings ----------------------------------------------------------------------------------
def test_conf_shows_the_defaults_and_the_wire_round_trips():
    assert TTASettings.from_config(compose([])) == TTASettings()
    assert TTASettings().to_wire() == {}  # off: nothing new on the wire
    on = TTASettings.from_config(compose(["tta.methods=[lame,adabn]", "tta.lame.knn=3"]))
    assert on == TTASettings(methods=("lame", "adabn"), lame_knn=3)
    assert TTASettings.from_wire(on.to_wire()) == on
    assert TTASettings.from_wire({}) == TTASettings()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tta.methods=[tent]", r"tta.methods has \['tent'\]"),
        ("tta.methods=[lame,lame]", "tta.methods has duplicates"),
        ("tta.methods=lame", "tta.methods='lame' is not a list"),
        ("tta.lame.affinity=linear", "tta.lame.affinity='linear'"),
        ("tta.lame.knn=0", "tta.lame.knn must be >= 1"),
        ("tta.lame.batch_size=1", "tta.lame.batch_size must be >= 2"),
    ],
)
def test_bad_tta_settings_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["data.domains=[mnist,usps,mnistm]", override]))


# The target's reply and the run record ---------------------------------------------------------
def node_configs(cache) -> dict[int, dict]:
    return {nid: {"domain": d, "role": r, "data-dir": str(cache)} for nid, (d, r) in NODES.items()}


def evaluate_reply(grid: InProcessGrid, node: int, config: dict) -> Message:
    torch.manual_seed(0)
    content = RecordDict(
        {ARRAYS: to_record(get_weights(build_model("digit_cnn"))), CONFIG: to_config(config)}
    )
    (reply,) = grid.send_and_receive([Message(content, node, MessageType.EVALUATE)])
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


@pytest.mark.usefixtures("task_identity")
def test_the_target_reply_adds_only_the_tta_accuracies(digits_cache):
    grid = InProcessGrid(client_app, node_configs(digits_cache))
    plain_cfg = silo_config(digits_cache)
    tta_cfg = {**plain_cfg, **TTA_ON.to_wire()}
    plain, adapted = evaluate_reply(grid, 13, plain_cfg), evaluate_reply(grid, 13, tta_cfg)
    assert set(adapted.content.keys()) == set(plain.content.keys()) == {METRICS, "silo"}
    new = set(adapted.content[METRICS]) - set(plain.content[METRICS])
    assert new == {metric_key("lame"), metric_key("adabn")}
    for key in new:
        assert 0.0 <= adapted.content[METRICS][key] <= 1.0
    assert adapted.content[METRICS]["test-accuracy"] == plain.content[METRICS]["test-accuracy"]
    source = evaluate_reply(grid, 11, tta_cfg)  # a source evaluates plainly
    assert not {metric_key("lame"), metric_key("adabn")} & set(source.content[METRICS])


SMALL_VOTE = FedKASettings(
    name="fedvote",
    align=False,
    disentangle=DisentangleSettings(enabled=False),
    embed_samples=0,
    vote_samples=256,
    finetune_steps=4,
)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("kind", "settings"),
    [(SiloFedAvg, FedAvgSettings()), (FedKA, SMALL_VOTE)],
    ids=["fedavg-evaluate", "fedvote-embed-and-vote"],
)
def test_a_run_records_the_tta_accuracies_every_round(tmp_path, digits_cache, kind, settings):
    grid = InProcessGrid(client_app, node_configs(digits_cache))
    cfg = compose(["data.domains=[mnist,usps,mnistm]"])
    recorder = RunRecorder(tmp_path / "run", {"name": "t"}, target="mnistm")
    metered = MeteredGrid(grid)
    roster = discover_silos(metered, silos(cfg), timeout=10, data_config={})
    strategy = assemble(kind, settings, roster, recorder, 1)
    config = to_config({**silo_config(digits_cache, **{"local-steps": 5}), **TTA_ON.to_wire()})
    torch.manual_seed(0)
    strategy.start(
        grid=metered,
        initial_arrays=to_record(get_weights(build_model("digit_cnn"))),
        num_rounds=1,
        timeout=60,
        train_config=config,
        evaluate_config=config,
    )
    lines = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1]
    for line in lines:
        target = line["silos"]["mnistm"]
        for method in ("lame", "adabn"):
            assert line[line_key(method)] == target[metric_key(method)]
            assert 0.0 <= line[line_key(method)] <= 1.0
        assert not any(key.startswith("tta-") for key in line["silos"]["mnist"])


# The results rows ------------------------------------------------------------------------------
def write_cell(path, accuracies: list[float], lame: list[float] | None) -> None:
    path.mkdir(parents=True)
    lines = []
    for rnd, acc in enumerate(accuracies):
        line = {"round": rnd, "target_accuracy": acc, "wall_seconds": 1.0, "silos": {}}
        line |= {"bytes_sent": 10, "bytes_received": 20}
        if lame is not None:
            line[line_key("lame")] = lame[rnd]
        lines.append(json.dumps(line))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    rounds = accuracies[1:]
    summary = {
        "status": "completed",
        "rounds_completed": len(rounds),
        "mean_last5_target_accuracy": float(np.mean(rounds[-5:])),
        "final_target_accuracy": rounds[-1],
        "best_target_accuracy": max(rounds),
        "best_round": 1 + rounds.index(max(rounds)),
        "wall_seconds": 7.0,
    }
    (path / "summary.json").write_text(json.dumps(summary))


def test_results_show_a_tta_row_for_the_cells_that_carry_it(tmp_path):
    preset = {"name": "p", "targets": ["t"], "methods": {"m": [], "n": []}, "seeds": [0, 1]}
    plain = [0.1, 0.5, 0.6, 0.6, 0.7, 0.7, 0.8]
    lame_accs = [[0.1, 0.5, 0.7, 0.7, 0.9, 0.7, 0.8], [0.1, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]]
    for seed in (0, 1):
        write_cell(tmp_path / "p" / "t" / "m" / f"seed{seed}", plain, lame_accs[seed])
        write_cell(tmp_path / "p" / "t" / "n" / f"seed{seed}", plain, None)
    rows = collect(preset, tmp_path, lambda *a: None, lambda m: {})
    assert [r["method"] for r in rows] == ["m", "m + LAME", "m", "m + LAME", "n", "n"]
    seed0 = rows[1]
    assert seed0["last5_accuracy"] == pytest.approx((0.7 + 0.7 + 0.9 + 0.7 + 0.8) / 5)
    assert (seed0["final_accuracy"], seed0["best_accuracy"], seed0["best_round"]) == (0.8, 0.9, 4)
    assert seed0["mb_sent_per_round"] == rows[0]["mb_sent_per_round"]  # the same run's cost
    table = accuracy_table(rows, preset, "last5_accuracy").splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| m", "| m + LAME", "| n"]
    mean = 100 * np.mean([0.76, 0.6])
    std = 100 * np.std([0.76, 0.6], ddof=1)
    assert table[3] == f"| m + LAME | {mean:.1f} ± {std:.1f} | {mean:.1f} ± {std:.1f} |"
    docs = tmp_path / "docs"
    docs.mkdir()
    paths = write_results(preset, tmp_path, docs, "s", lambda *a: None, lambda m: {})
    assert "Cells complete: 4/4." in paths["md"].read_text()  # the TTA rows are no cells
