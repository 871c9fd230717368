"""Snapshot files the fuzz campaign (ci/fuzz/fuzz_snapshot.py) found raising out of the loader:
JSON nested deeper than the decoder recurses, or with an integer over Python's digit limit,
is refused with a SnapshotError like any other malformed JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmsh.engine.persist import CONFIG_FILE, MEMORY_FILE, STATE_FILE, node, node_data, read_snapshot
from vmsh.errors import SnapshotError

DEEP = "[" * 100_000 + "]" * 100_000
DIGITS = '{"index": ' + "9" * 4301 + "}"


@pytest.mark.parametrize(("text", "why"), [(DEEP, "nested too deeply"), (DIGITS, "more than 4300 digits")],
                         ids=["deep", "digits"])
def test_node_state_beyond_the_json_limits(text: str, why: str) -> None:
    tree = node(children={"dev": {"snapshots": {}, "snapshot_data": {"state": text}}})
    with pytest.raises(SnapshotError, match=f"node dev has malformed state: .*{why}"):
        node_data(tree, "dev")


@pytest.mark.parametrize(("text", "why"), [(DEEP, "nested too deeply"), (DIGITS, "more than 4300 digits")],
                         ids=["deep", "digits"])
def test_state_file_beyond_the_json_limits(tmp_path: Path, text: str, why: str) -> None:
    (tmp_path / CONFIG_FILE).write_text("{}")
    (tmp_path / STATE_FILE).write_text(text)
    (tmp_path / MEMORY_FILE).write_bytes(b"")
    with pytest.raises(SnapshotError, match=f"state.json is not JSON: .*{why}"):
        read_snapshot(str(tmp_path))
