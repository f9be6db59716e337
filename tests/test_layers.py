"""The floors' rule, read from the code's own imports: the Flower-free core imports nothing
above it, and only the command line imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_packages(package: str) -> dict[str, set[str]]:
    """For each .py file under ``package``: the top-level packages it imports (anywhere in it,
    also inside functions)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("package", "above"),
    [
        ("fedalign", {"strategies", "client", "server", "cli"}),
        ("strategies", {"cli"}),
        ("client", {"cli"}),
        ("server", {"cli"}),
    ],
)
def test_no_package_imports_a_floor_above_it(package, above):
    files = imported_packages(package)
    assert files, f"no Python files under {package}/"
    upward = {path: sorted(names & above) for path, names in files.items() if names & above}
    assert not upward, f"imports from a higher floor: {upward}"


def test_the_rule_is_read_from_real_imports():
    assert "server" in imported_packages("cli")["cli/run.py"]
    assert "fedalign" in imported_packages("server")["server/launcher.py"]
