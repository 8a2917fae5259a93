"""Imports only run downwards: gemfs (model, protocol, FUSE server) < driver < tools < gemfs_cli.

Checked on the source text (ast), so a lazy import inside a function counts as much as one at
the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"gemfs": 0, "driver": 1, "tools": 2, "gemfs_cli": 3}


def imported(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
    return out


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_no_module_imports_a_higher_floor(package: str) -> None:
    floor = FLOORS[package]
    bad = []
    for path in sources(package):
        for line, module in imported(path):
            top = module.split(".")[0]
            if FLOORS.get(top, -1) > floor:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_model_and_the_codec_stay_below_the_server() -> None:
    """gemfs.mm imports only gemfs.mm; the protocol codec imports no server, FUSE or CLI code."""
    for path in sources("gemfs/mm"):
        for line, module in imported(path):
            if module.startswith("gemfs."):
                assert module.startswith("gemfs.mm"), f"{path.name}:{line} imports {module}"
    for name in ("protocol.py", "arrays.py", "errors.py"):
        for line, module in imported(ROOT / "gemfs" / "control" / name):
            if module.startswith("gemfs."):
                assert module.startswith(
                    (
                        "gemfs.mm",
                        "gemfs.control.protocol",
                        "gemfs.control.errors",
                        "gemfs.control.arrays",
                    )
                ), f"{name}:{line} imports {module}"


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The scan is not vacuous: an upward import in a module is found."""
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from gemfs_cli.main import main\n    return main\n")
    assert imported(bad) == [(2, "gemfs_cli.main")]
    assert len(sources("gemfs")) > 20
    assert len(sources("gemfs_cli")) >= 9
    assert any(m.startswith("tools.") for p in sources("gemfs_cli") for _, m in imported(p))


def test_the_console_script_is_the_top_floor() -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'gemfs = "gemfs_cli.main:main"' in text
    assert not (ROOT / "gemfs" / "cli.py").exists()
    assert not list((ROOT / "gemfs").glob("cmd_*.py"))
