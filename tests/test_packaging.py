"""The Flower app bundle (FAB) carries code and configs only: never data or outputs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fab_holds_only_code_and_configs(tmp_path):
    app = tmp_path / "app"
    shutil.copytree(
        ROOT, app, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info")
    )
    # Leftovers a user may have in the checkout must not enter the bundle.
    (app / "outputs" / "run").mkdir(parents=True)
    (app / "outputs" / "run" / "metrics.jsonl").write_text("{}\n")
    (app / "outputs" / "run" / "summary.json").write_text("{}\n")
    (app / "digits.npz").write_bytes(b"0" * 1000)
    flwr = str(Path(sys.executable).parent / "flwr")
    done = subprocess.run(
        [flwr, "build", "--app", str(app)], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    fab = next(tmp_path.glob("*.fab"))
    names = zipfile.ZipFile(fab).namelist()
    assert "server/app.py" in names and "client/app.py" in names and "conf/config.yaml" in names
    assert not [n for n in names if n.startswith(("outputs/", "tests/", ".venv/"))]
    assert not [n for n in names if n.startswith("cli/")]  # the command line stays home
    allowed = (".py", ".yaml", ".toml", ".sha256", ".json")
    assert all(n.endswith(allowed) or n.startswith(".info/") for n in names), names
    assert not [n for n in names if n.endswith(".json") and not n.startswith(".info/")]
    assert fab.stat().st_size < 1_000_000  # code only; Flower accepts up to 10 MB
