"""The one atomic writer: a file is replaced whole or not at all, with the mode asked for."""

from __future__ import annotations

import os
import stat

import pytest

from fedalign import atomic


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "made" / "summary.json"
    atomic.write_text(path, "old")
    atomic.write_text(path, "nëw")
    assert path.read_bytes() == "nëw".encode()
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_private_file_is_readable_by_its_owner_alone(tmp_path):
    path = tmp_path / "silo.key"
    atomic.write_bytes(path, b"secret", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    atomic.write_text(path, "old")

    def full_disk(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        atomic.write_text(path, "new")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]
