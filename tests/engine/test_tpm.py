"""``--tpm`` on a built VM against a real swtpm: the guest finds the TPM2 table and the CRB page
at cloud-hypervisor's address, a TPM2_GetRandom written through the MMIO bus (as Linux's tpm_crb
does) is answered, a snapshot is refused clearly, and a missing swtpm refuses the VM."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine import tiny_kernel
from tests.engine.conftest import run_now
from tests.engine.test_hotplug import Events
from tests.unit.devices.test_tpm import get_random_command, needs_swtpm, startup_command
from tests.unit.devices.test_tpm import swtpm as swtpm
from vmsh.config import normalize, vm_config_from_argv
from vmsh.devices import tpm as crb
from vmsh.engine.builder import build_for_boot
from vmsh.engine.describe import describe
from vmsh.engine.persist import SnapshotError
from vmsh.engine.state import VmState
from vmsh.engine.vm import Vm
from vmsh.errors import VmshError

TPM = 0xFED4_0000


def _build(tmp_path: Path, sock: Path) -> Vm:
    kernel = tmp_path / "hello.elf"
    kernel.write_bytes(tiny_kernel.hello_poweroff())
    cfg = normalize(vm_config_from_argv(["--kernel", str(kernel), "--serial", "null", "--console", "off",
                                         "--tpm", f"socket={sock}"]))
    return build_for_boot(cfg, Events(), lambda kind, detail: None, run_now)


@pytest.fixture
def tpm_vm(tmp_path: Path, swtpm: tuple[object, Path]) -> Iterator[Vm]:
    vm = _build(tmp_path, swtpm[1])
    try:
        yield vm
    finally:
        vm.shutdown()


def _command(vm: Vm, command: bytes) -> bytes:
    def w(off: int, value: int) -> None:
        vm.mmio.write(TPM + off, value.to_bytes(4, "little"))
    w(crb.LOC_CTRL, crb.LOC_CTRL_REQUEST_ACCESS)
    w(crb.CTRL_REQ, crb.CTRL_REQ_CMD_READY)
    for i in range(0, len(command), 8):
        vm.mmio.write(TPM + crb.DATA_BUFFER + i, command[i:i + 8])
    w(crb.CTRL_START, crb.START_INVOKE)
    header = vm.mmio.read(TPM + crb.DATA_BUFFER, 8) + vm.mmio.read(TPM + crb.DATA_BUFFER + 8, 2)
    size = int.from_bytes(header[2:6], "big")
    return header + vm.mmio.read(TPM + crb.DATA_BUFFER + 10, size - 10)


@needs_swtpm
def test_guest_view_and_a_command(tpm_vm: Vm) -> None:
    desc = describe(tpm_vm)
    tpm2 = [t for t in desc["acpi"] if t["signature"] == "TPM2"]
    assert len(tpm2) == 1
    assert struct.unpack_from("<QI", bytes.fromhex(tpm2[0]["hex"]), 40) == (TPM + 0x40, 7)
    assert int.from_bytes(tpm_vm.mmio.read(TPM + crb.INTF_ID, 4), "little") == crb.INTF_ID_VALUE
    assert struct.unpack(">HII", _command(tpm_vm, startup_command())) == (0x8001, 10, 0)
    rsp = _command(tpm_vm, get_random_command(8))
    assert struct.unpack_from(">HIIH", rsp) == (0x8001, 20, 0, 8)


@needs_swtpm
def test_snapshot_is_refused(tpm_vm: Vm, tmp_path: Path) -> None:
    # the refusal comes before anything is read from the vCPUs, so a built VM marked paused shows it
    tpm_vm.state = VmState.PAUSED
    with pytest.raises(SnapshotError, match=r"Cannot snapshot a VM with a TPM \(--tpm\)"):
        tpm_vm.snapshot(str(tmp_path / "snap"))
    assert not (tmp_path / "snap").exists()
    tpm_vm.state = VmState.CREATED


def test_missing_swtpm_refuses_the_vm(tmp_path: Path) -> None:
    with pytest.raises(VmshError) as refused:
        _build(tmp_path, tmp_path / "no-swtpm.sock")
    assert f"The TPM socket {tmp_path / 'no-swtpm.sock'} does not exist" in str(refused.value)
