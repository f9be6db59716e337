"""fedalign.checkpoint: atomic files whose every byte is checked before use."""

from __future__ import annotations

import numpy as np
import pytest

from fedalign.checkpoint import CheckpointError, load, save


def test_round_trip_keeps_state_and_arrays(tmp_path):
    path = tmp_path / "ckpt.npz"
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(3)}
    save(path, {"round": 4, "note": "x"}, {"model": arrays, "rng": {"torch": np.ones(5, np.uint8)}})
    state, groups = load(path)
    assert state == {"round": 4, "note": "x"}
    assert set(groups) == {"model", "rng"}
    assert all(np.array_equal(groups["model"][k], v) for k, v in arrays.items())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]  # no temp file left


def test_an_edited_array_fails_the_digest(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, {"round": 1}, {"model": {"w": np.zeros(3, np.float32)}})
    with np.load(path) as data:
        flat = {k: data[k] for k in data.files}
    flat["model/w"] = np.ones(3, np.float32)  # a valid zip whose content was changed
    np.savez(path, **flat)
    with pytest.raises(CheckpointError, match=r"integrity check \(sha256 mismatch\)"):
        load(path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_file_is_reported_not_loaded(tmp_path, damage):
    path = tmp_path / "ckpt.npz"
    save(path, {"round": 1}, {"model": {"w": np.zeros(1000, np.float32)}})
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = bytearray(b"not a checkpoint")
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="it was not loaded"):
        load(path)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, {"round": 1}, {"model": {"w": np.zeros(3)}})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save(path, {"round": 2, "bad": object()}, {"model": {"w": np.ones(3)}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]
