"""Exact resume of a FedKA run (in process): the checkpoint carries FedKA's state (target
embeddings, the model the next round starts from) and the silos reload their own state."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from client.app import app as client_app
from fedalign import checkpoint
from fedalign.checkpoint import CHECKPOINT, load_resume
from fedalign.config import compose, validate
from fedalign.runlog import RunRecorder
from server.app import run
from tests.conftest import InProcessGrid

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.mark.parametrize("start_from", ["finetuned", "averaged"])
def test_fedka_resumed_after_round_2_ends_with_identical_weights(
    tmp_path, digits_cache, monkeypatch, start_from
):
    run_dir, state_dir = tmp_path / "run", tmp_path / "silo-state"
    cfg = compose(
        [
            "data.domains=[mnist,usps,mnistm]",
            "strategy=fedka",
            f"strategy.start_from={start_from}",
            "strategy.embed_samples=64",
            "strategy.vote_samples=256",
            "strategy.finetune_steps=4",
            "rounds=3",
            "train.local_steps=5",
            f"data.cache_dir={digits_cache}",
            f"output.run_dir={run_dir}",
            "wandb.mode=disabled",
        ]
    )
    validate(cfg)
    roles = {11: ("mnist", "source"), 12: ("usps", "source"), 13: ("mnistm", "target")}
    nodes = {
        n: {"domain": d, "role": r, "data-dir": str(digits_cache), "state-dir": str(state_dir)}
        for n, (d, r) in roles.items()
    }
    save = checkpoint.save

    def keep_round_2(path, state, groups):
        save(path, state, groups)
        if state["round"] == 2:  # what a crash during round 3 would leave behind
            shutil.copy(path, tmp_path / "round2.npz")
            shutil.copytree(state_dir, tmp_path / "silo-state-round2")

    monkeypatch.setattr(checkpoint, "save", keep_round_2)
    run(InProcessGrid(client_app, nodes), cfg, RunRecorder(run_dir, {}, "mnistm"))
    with np.load(run_dir / "final_weights.npz") as data:
        uninterrupted = {k: data[k] for k in data.files}
    assert not any(state_dir.rglob("*.npz"))  # the finished run removed the silos' state

    shutil.copy(tmp_path / "round2.npz", run_dir / CHECKPOINT)
    shutil.rmtree(state_dir)
    shutil.copytree(tmp_path / "silo-state-round2", state_dir)
    cfg.resume = True
    resume = load_resume(cfg, run_dir)
    assert resume[0]["round"] == 2 and "embeddings" in resume[1]
    assert ("next" in resume[1]) == (start_from == "finetuned")
    recorder = RunRecorder(run_dir, {}, "mnistm", state=resume[0]["recorder"])
    run(InProcessGrid(client_app, nodes), cfg, recorder, resume)  # fresh silo contexts
    with np.load(run_dir / "final_weights.npz") as data:
        assert set(data.files) == set(uninterrupted)
        for name, value in uninterrupted.items():
            assert np.array_equal(data[name], value), name
    rounds = [line["round"] for line in recorder.lines]
    assert rounds == [0, 1, 2, 3]
