"""docs/results*.md and .csv are exactly what `fedalign results` writes from the committed run
folders in results/ (regenerate them with `make results PRESET=<preset>`, never by hand)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.grid import grid_command

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = sorted((ROOT / "docs").glob("results*.md"))


def preset_of(doc: Path) -> str:
    """``results.md`` is the full grid's; ``results-<preset>.md`` another preset's."""
    return "full" if doc.stem == "results" else doc.stem.removeprefix("results-")


def test_every_published_table_has_its_run_folders():
    assert PUBLISHED, "no docs/results*.md"
    for doc in PUBLISHED:
        assert (ROOT / "results" / preset_of(doc)).is_dir(), doc.name


@pytest.mark.parametrize("doc", PUBLISHED, ids=lambda doc: doc.name)
def test_published_results_are_what_the_run_folders_give(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the files name their run folders `results/<preset>/`
    grid_command("results", [preset_of(doc), "--docs", str(tmp_path)])
    # not the .png: its bytes also carry matplotlib's version
    for published in (doc, doc.with_suffix(".csv")):
        generated = (tmp_path / published.name).read_text()
        assert generated == published.read_text(), f"{published.name} differs from its run folders"
