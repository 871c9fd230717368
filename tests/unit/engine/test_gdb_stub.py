"""The gdb stub's pieces without KVM: packet framing, the register block and target
description, the debug-register encoding, and the packet replies over a fake paused VM."""

from __future__ import annotations

import socket
import struct
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vmsh.engine.gdb import packets
from vmsh.engine.gdb.guest_debug import (
    KVM_GUESTDBG_BLOCKIRQ,
    KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP,
    RW_WRITE,
    GuestDebug,
    HwBreakpoint,
    encode,
)
from vmsh.engine.gdb.registers import LAYOUT, NUMBERS, RegisterFile, target_xml
from vmsh.engine.gdb.stub import _Session
from vmsh.engine.gdb.target import DebugTarget
from vmsh.engine.kvm_types import Fpu, Regs, Sregs, VcpuEvents
from vmsh.engine.state import VmState
from vmsh.errors import GuestMemoryError, VmshError


def test_framing_checksums_acks_and_interrupts() -> None:
    assert packets.frame(b"OK") == b"$OK#9a"
    dec = packets.Decoder()
    events = dec.feed(b"+$g#67\x03$m0,4#f")
    assert events == [packets.Packet(b"g"), packets.Interrupt()]
    assert dec.feed(b"d") == [packets.Packet(b"m0,4")]
    assert dec.feed(b"$g#00") == [packets.BadChecksum()]
    assert packets.unescape(packets.escape(b"a#b$c}d*e")) == b"a#b$c}d*e"
    assert b"#" not in packets.escape(b"#$")


def test_target_description_lists_the_block_in_order() -> None:
    root = ET.fromstring(target_xml())
    names = [reg.get("name") for reg in root.iter("reg")]
    assert names == [r.name for r in LAYOUT]
    assert names[:18] == ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *[f"r{i}" for i in range(8, 16)],
                          "rip", "eflags"]
    features = [f.get("name") for f in root.iter("feature")]
    assert features == ["org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments",
                        "org.gnu.gdb.i386.sys"]


def test_register_block_encoding() -> None:
    regs = Regs(rax=0x1122334455667788, rip=0xFFFFFFFF81000000, rflags=0x1_0000_0246)
    sregs = Sregs(cr3=0x3000, efer=0xD01)
    sregs.cs.selector = 0x10
    block = RegisterFile(regs, sregs, Fpu()).block()
    assert len(block) == sum(r.bits for r in LAYOUT) // 8
    assert block[:8] == struct.pack("<Q", 0x1122334455667788)
    assert block[16 * 8:17 * 8] == struct.pack("<Q", 0xFFFFFFFF81000000)
    assert block[17 * 8:17 * 8 + 4] == struct.pack("<I", 0x246)  # eflags: 32 bits
    assert block[17 * 8 + 4:17 * 8 + 8] == struct.pack("<I", 0x10)  # cs
    assert block[-8:] == struct.pack("<Q", 0xD01)  # efer last


def test_debug_registers_for_breakpoints_and_watchpoints() -> None:
    debug = GuestDebug(single_step=True, hw=[HwBreakpoint(0x1000), HwBreakpoint(0x2000, RW_WRITE, 8)])
    control, _pad, *dr = struct.unpack("<II8Q", encode(debug))
    assert control == KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ | KVM_GUESTDBG_USE_HW_BP
    assert dr[:2] == [0x1000, 0x2000]
    # G0, G1, GE, bit 10; DR1: R/W=01 (write), LEN=10 (8 bytes)
    assert dr[7] == 1 << 1 | 1 << 3 | 1 << 9 | 1 << 10 | 0b01 << 20 | 0b10 << 22
    assert struct.unpack("<I", encode(GuestDebug())[:4]) == (0,)


class FakeMemory:
    """Identity-mapped guest RAM (paging off): 64 KiB."""

    def __init__(self) -> None:
        self.ram = bytearray(0x10000)

    def _check(self, addr: int, length: int) -> None:
        if addr + length > len(self.ram):
            raise GuestMemoryError(f"{addr:#x} is outside RAM")

    def read(self, addr: int, length: int) -> bytes:
        self._check(addr, length)
        return bytes(self.ram[addr:addr + length])

    def write(self, addr: int, data: bytes) -> None:
        self._check(addr, len(data))
        self.ram[addr:addr + len(data)] = data

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")


class FakeFd:
    def __init__(self) -> None:
        self.regs = Regs(rip=0x1234)
        self.fd = -1

    def get_regs(self) -> Regs:
        return Regs(**{k: getattr(self.regs, k) for k in self.regs.__slots__})

    def set_regs(self, regs: Regs) -> None:
        self.regs = regs

    def get_sregs(self) -> Sregs:
        return Sregs()

    def get_fpu(self) -> Fpu:
        return Fpu()


def session() -> tuple[_Session, Any]:
    vm = SimpleNamespace(vcpus=[SimpleNamespace(index=0, fd=FakeFd()), SimpleNamespace(index=1, fd=FakeFd())],
                         memory=FakeMemory(), state=VmState.PAUSED)
    control = SimpleNamespace(lock=threading.RLock(), vm=vm, do=lambda *_a: None)
    a, _b = socket.socketpair()
    s = _Session(control, a, -1)  # type: ignore[arg-type]  # a fake VMM
    s.debug.vm = vm
    s.target = s.debug.target = DebugTarget(vm)
    return s, vm


def test_replies_over_a_fake_paused_vm() -> None:
    s, vm = session()
    vm.memory.write(0x100, b"hello")
    assert s._dispatch(b"m100,5") == b"hello".hex().encode()
    assert s._dispatch(b"m20000,4") == b"E0e"  # outside RAM: EFAULT, never an exception
    assert s._dispatch(b"M200,2:abcd") == b"OK" and vm.memory.ram[0x200:0x202] == b"\xab\xcd"
    assert s._dispatch(b"X300,3:a}\x03b") == b"OK" and vm.memory.ram[0x300:0x303] == b"a#b"
    assert s._dispatch(b"qfThreadInfo") == b"m1,2" and s._dispatch(b"qsThreadInfo") == b"l"
    assert s._dispatch(b"Hg2") == b"OK" and s._dispatch(b"qC") == b"QC2"
    assert s._dispatch(b"Hg9") == b"E01"
    rip = s._dispatch(b"p%x" % NUMBERS["rip"])
    assert rip == (0x1234).to_bytes(8, "little").hex().encode()
    assert s._dispatch(b"P%x=%s" % (NUMBERS["rax"], (7).to_bytes(8, "little").hex().encode())) == b"OK"
    assert vm.vcpus[1].fd.regs.rax == 7
    assert s._dispatch(b"P%x=00000000" % NUMBERS["cs"]) == b"E16"  # segments are not writable
    # a G block that changes only rbx is accepted
    block = bytearray(bytes.fromhex(s._dispatch(b"g").decode()))
    block[8:16] = (9).to_bytes(8, "little")
    assert s._dispatch(b"G" + bytes(block).hex().encode()) == b"OK" and vm.vcpus[1].fd.regs.rbx == 9
    assert s._dispatch(b"qSupported:multiprocess+").startswith(b"PacketSize=")
    assert s._dispatch(b"qRcmd,6869") == b""  # not supported: the empty reply
    xml = s._dispatch(b"qXfer:features:read:target.xml:0,20")
    assert xml.startswith(b"m<?xml")


def test_software_breakpoints_patch_int3_and_hide_it() -> None:
    s, vm = session()
    vm.memory.write(0x400, b"\x55\x48")
    assert s._dispatch(b"Z0,400,1") == b"OK"
    assert vm.memory.ram[0x400] == 0xCC
    assert s._dispatch(b"m400,2") == b"5548"  # the debugger sees the original byte
    insn = SimpleNamespace(fd=SimpleNamespace(get_regs=lambda: Regs(rip=0x400)))
    assert s.target is not None and s.target.is_breakpoint(insn, b"\xcc")
    assert not s.target.is_breakpoint(insn, b"\x0f\x01\xca")
    assert s._dispatch(b"z0,400,1") == b"OK" and vm.memory.ram[0x400] == 0x55
    assert s._dispatch(b"Z0,20000,1") == b"E0e"
    for i in range(4):
        assert s._dispatch(b"Z1,%x,1" % (0x500 + i)) == b"OK"
    assert s._dispatch(b"Z1,600,1") == b"E1c"  # four debug registers
    assert s._dispatch(b"Z2,601,4") == b"E16"  # a watchpoint must be aligned


@pytest.mark.parametrize("packet", [b"m", b"mzz,1", b"Hgq", b"Z9", b"P1"])
def test_malformed_packets_are_errors(packet: bytes) -> None:
    s, _vm = session()
    assert s._dispatch(packet) in (b"E16", b"")


class FakeVcpuFd(FakeFd):
    """A vCPU fd whose run page says KVM_EXIT_DEBUG for an INT3 (vector 3) at ``rip``."""

    def __init__(self, rip: int) -> None:
        super().__init__()
        self.regs = Regs(rip=rip)
        self.vcpu_id = 0
        self.run_mmap = bytearray(4096)
        struct.pack_into("<IIQQQ", self.run_mmap, 32, 3, 0, rip, 0, 0)
        self.events = VcpuEvents()

    def get_vcpu_events(self) -> VcpuEvents:
        return self.events

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        self.events = events


def test_a_guest_int3_that_is_not_a_breakpoint_goes_back_to_the_guest() -> None:
    from vmsh.engine.bus import Bus
    from vmsh.engine.kvm_vcpu import EXIT_DEBUG
    from vmsh.engine.vcpu import Vcpu, VcpuStop

    s, _vm = session()
    assert s.target is not None
    s.target._sw_addrs = frozenset({0x400})
    ours = Vcpu(FakeVcpuFd(0x400), Bus("pio"), Bus("mmio"))  # type: ignore[arg-type]  # a fake fd
    ours.debug_filter = s.debug._filter
    assert ours._slow_exit(EXIT_DEBUG) is VcpuStop.DEBUG and ours.debug_exit == (3, 0x400, 0, 0)
    theirs = Vcpu(FakeVcpuFd(0x500), Bus("pio"), Bus("mmio"))  # type: ignore[arg-type]  # a fake fd
    theirs.debug_filter = s.debug._filter
    assert theirs._slow_exit(EXIT_DEBUG) is None  # the guest's own: #BP injected, rip past the 0xCC
    fd = theirs.fd
    assert fd.regs.rip == 0x501 and fd.events.exception_injected == 1 and fd.events.exception_nr == 3


def test_a_vm_resumed_behind_the_debugger_is_not_touched() -> None:
    s, vm = session()
    vm.state = VmState.RUNNING  # vm.resume through the API while gdb thinks it stopped
    assert s._dispatch(b"g") == b"E10" and s._dispatch(b"m100,4") == b"E10" and s._dispatch(b"Z0,400,1") == b"E10"
    assert s._dispatch(b"qfThreadInfo") == b"m1,2"  # what does not touch the vCPUs still answers


def test_the_stub_replaces_a_stale_socket_but_never_a_file(tmp_path: Path) -> None:
    from vmsh.engine.gdb.stub import GdbStub

    control = SimpleNamespace(lock=threading.RLock(), vm=None, do=lambda *_a: None)
    path = tmp_path / "gdb.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    stub = GdbStub(control, str(path)).start()  # type: ignore[arg-type]  # a fake VMM
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))  # no VM: the stub hangs up
    client.settimeout(10)
    assert client.recv(16) == b""
    client.close()
    stub.close()
    assert not path.exists()
    path.write_text("keep me")
    with pytest.raises(VmshError, match="Cannot listen on the gdb socket"):
        GdbStub(control, str(path)).start()  # type: ignore[arg-type]  # a fake VMM
    assert path.read_text() == "keep me"
