"""The two sides meet only in the core: the silos import nothing from the server side."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_packages(path: Path) -> set[str]:
    """Top-level packages (and ``fedalign.<module>``) a file imports, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("client", {"strategies", "server"}),
        ("strategies", {"client", "server"}),
        ("fedalign/settings", {"client", "strategies", "server", "flwr"}),
    ],
)
def test_imports_point_down(folder, forbidden):
    for path in sorted((ROOT / folder).rglob("*.py")):
        wrong = imported_packages(path) & forbidden
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_the_protocol_module_is_the_only_core_module_that_knows_flower_records():
    assert "flwr" in imported_packages(ROOT / "fedalign" / "protocol.py")
    assert not imported_packages(ROOT / "fedalign" / "protocol.py") & {"strategies", "server"}
