"""tests/unit/ mirrors vmsh/: every folder of unit tests is named after the vmsh package it tests
and is a package itself (so test modules of the same name in two folders do not clash under
pytest's default import mode); a test file at the top names a top-level vmsh module, or tests
the tree as a whole."""

from __future__ import annotations

from pathlib import Path

UNIT = Path(__file__).resolve().parent
VMSH = UNIT.parents[1] / "vmsh"
#: tests of the source tree as a whole (its layout, its import layers), not of one module
WHOLE_TREE = {"test_layout.py", "test_layers.py"}


def folders() -> list[Path]:
    return sorted(p for p in UNIT.rglob("*") if p.is_dir() and p.name != "__pycache__")


def test_every_folder_is_a_vmsh_package() -> None:
    strays = [str(p.relative_to(UNIT)) for p in folders() if not (VMSH / p.relative_to(UNIT) / "__init__.py").is_file()]
    assert folders() and strays == []


def test_every_folder_is_a_test_package() -> None:
    assert [str(p.relative_to(UNIT)) for p in folders() if not (p / "__init__.py").is_file()] == []


def test_top_level_tests_name_top_level_modules() -> None:
    tops = [p for p in UNIT.glob("test_*.py") if p.name not in WHOLE_TREE]
    assert tops and [p.name for p in tops if not (VMSH / p.name.removeprefix("test_")).is_file()] == []
