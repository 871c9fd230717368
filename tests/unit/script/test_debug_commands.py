"""The shell's debugging commands without a VM: their errors, ``delete``'s two meanings, the
System.map lookups, and ``coredump``'s request."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmsh.script.debug_commands import SymbolMap
from vmsh.script.session import ScriptError


@pytest.fixture
def system_map(tmp_path: Path) -> Path:
    path = tmp_path / "System.map"
    path.write_text("ffffffff81000000 T _stext\nffffffff8112ed20 T ksys_sync\nffffffff8112eda0 T __x64_sys_sync\n")
    return path


def test_symbol_map_names_addresses(system_map: Path) -> None:
    symbols = SymbolMap(str(system_map))
    assert symbols.by_name["ksys_sync"] == 0xFFFFFFFF8112ED20
    assert symbols.name(0xFFFFFFFF8112ED20) == "ksys_sync"
    assert symbols.name(0xFFFFFFFF8112ED24) == "ksys_sync+0x4"
    assert symbols.function(0xFFFFFFFF8112EDA9) == "__x64_sys_sync"
    assert symbols.name(0x1000) == "0x1000"


def test_debugger_commands_without_a_vm_fail_clearly(session, system_map: Path) -> None:
    session.execute(f"set system_map {system_map}")
    with pytest.raises(ScriptError, match="There is no running VM to debug"):
        session.execute("break ksys_sync")
    for line in ("continue", "step", "bt", "vx 0x1000", "delete 1"):
        with pytest.raises(ScriptError, match="No debugger is attached"):
            session.execute(line)
    with pytest.raises(ScriptError, match="continue takes timeout=DUR"):
        session.execute("continue 5")
    with pytest.raises(ScriptError, match="step takes a number"):
        session.execute("step x")
    session.execute("detach")  # nothing attached: nothing to do


def test_delete_without_arguments_is_still_the_vm_delete(session) -> None:
    session.execute("delete")  # vm.delete without a VM is accepted, as before
    with pytest.raises(ScriptError, match="VM is not created"):
        session.execute("info")


def test_coredump_asks_for_a_file_url(session, tmp_path: Path) -> None:
    with pytest.raises(ScriptError, match="coredump takes one argument"):
        session.execute("coredump")
    with pytest.raises(ScriptError, match="VM is not created"):
        session.execute(f"coredump {tmp_path}/core")
    assert not (tmp_path / "core").exists()
