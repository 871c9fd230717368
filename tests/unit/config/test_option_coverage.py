"""The option coverage table (tests/option_coverage.py) names every field of the config model,
and only those: a field added without saying how it takes effect or why it is refused fails here.
Its ``Elsewhere`` entries name tests that exist."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.option_coverage import TABLE, Elsewhere, model_fields

ROOT = Path(__file__).resolve().parents[3]


def test_table_covers_exactly_the_fields_of_the_model() -> None:
    fields = model_fields()
    assert len(fields) == len(set(fields))
    missing = sorted(set(fields) - set(TABLE))
    stale = sorted(set(TABLE) - set(fields))
    assert not missing, f"fields without a coverage entry (consumed how, or refused?): {missing}"
    assert not stale, f"entries for fields the model does not have: {stale}"


def test_model_walk_reaches_nested_dataclasses() -> None:
    fields = set(model_fields())
    assert {"VmConfig.cpus", "CpuTopology.packages", "NumaDistance.distance", "TokenBucketConfig.refill_time",
            "VirtQueueAffinity.host_cpus"} <= fields


def test_elsewhere_entries_name_existing_tests() -> None:
    for name, check in TABLE.items():
        if not isinstance(check, Elsewhere):
            continue
        path, test = check.test.split("::")
        tree = ast.parse((ROOT / path).read_text())
        names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert test in names, f"{name}: {check.test} does not exist"
