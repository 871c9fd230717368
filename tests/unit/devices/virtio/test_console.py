"""virtio-console: output to a callback, input buffered until the guest posts receive buffers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.devices.virtio.driver import Allocator, FakeRouter, PciDriver
from vmsh.devices.virtio.console import (
    MAX_PENDING_INPUT,
    VirtioConsole,
    VirtioConsoleState,
)
from vmsh.devices.virtio.device import VIRTIO_STATUS_DEVICE_NEEDS_RESET
from vmsh.devices.virtio.pci import VirtioPciDevice
from vmsh.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.errors import DeviceStateError


class Console:
    def __init__(self, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter, **kw: int) -> None:
        self.output: list[bytes] = []
        self.dev = VirtioConsole(out=self.output.append, **kw)
        self.pci = VirtioPciDevice(self.dev, mem, router)
        self.driver = PciDriver(self.pci, mem, alloc)
        self.mem, self.alloc = mem, alloc

    def probe(self) -> None:
        self.rx, self.tx = self.driver.probe()


@pytest.fixture
def con(mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter) -> Iterator[Console]:
    c = Console(mem, alloc, router, cols=80, rows=25)
    yield c
    c.pci.close()


def test_console_config(con: Console) -> None:
    con.probe()
    assert con.driver.device_config(0, 2) == 80 and con.driver.device_config(2, 2) == 25
    assert con.driver.device_config(4, 4) == 1
    assert con.pci.config.read(0, 4)[2:] == b"\x43\x10"


def test_console_output(con: Console) -> None:
    con.probe()
    a, b = con.alloc.alloc(6), con.alloc.alloc(6)
    con.mem.write(a, b"hello ")
    con.mem.write(b, b"world\n")
    head = con.tx.add([(a, 6, False), (b, 6, False)])
    con.driver.kick(1)
    assert con.output == [b"hello world\n"]
    assert con.tx.take_used() == [(head, 0)]
    assert con.dev.counters()["out_bytes"] == 12


def test_console_hands_on_queued_output_when_the_vm_is_torn_down(con: Console) -> None:
    """Output the guest queued but the I/O thread had not taken (no kick served yet) reaches the
    backend when the VM is torn down, before the device is reset."""
    con.probe()
    buf = con.alloc.alloc(16)
    con.mem.write(buf, b"System halted.\n")
    head = con.tx.add([(buf, 15, False)])
    assert con.output == []
    con.pci.close()
    assert con.output == [b"System halted.\n"]
    assert con.tx.take_used() == [(head, 0)]


def test_console_torn_down_after_the_driver_reset_it_sends_nothing(con: Console) -> None:
    con.probe()
    buf = con.alloc.alloc(4)
    con.mem.write(buf, b"gone")
    con.tx.add([(buf, 4, False)])
    con.driver.set_common(0x14, 0, 1)  # Linux's virtio_dev_shutdown resets the device at poweroff
    con.pci.close()
    assert con.output == []


def test_console_input_waits_for_buffers(con: Console, router: FakeRouter) -> None:
    con.probe()
    assert con.dev.enqueue_input(b"ls -l\n") == 6  # no receive buffers yet
    buf = con.alloc.alloc(4)
    head = con.rx.add([(buf, 4, True)])
    con.driver.kick(0)
    assert con.rx.take_used() == [(head, 4)] and con.mem.read(buf, 4) == b"ls -"
    head = con.rx.add([(buf, 4, True)])
    con.driver.kick(0)
    assert con.rx.take_used() == [(head, 2)] and con.mem.read(buf, 2) == b"l\n"
    assert router.fired.count(1) == 2
    head = con.rx.add([(buf, 4, True)])
    con.driver.kick(0)
    assert con.rx.take_used() == []
    con.dev.enqueue_input(b"x")  # a buffer is waiting: delivered at once
    assert con.rx.take_used() == [(head, 1)]


def test_console_input_bounded(con: Console) -> None:
    assert con.dev.enqueue_input(b"a" * (MAX_PENDING_INPUT + 10)) == MAX_PENDING_INPUT
    assert con.dev.enqueue_input(b"b") == 0


def test_console_emergency_write(con: Console) -> None:
    con.probe()
    con.driver.write(0x4000 + 8, ord("!"), 4)
    assert con.output == [b"!"]


def test_console_resize_signals_config(con: Console, router: FakeRouter) -> None:
    con.probe()
    con.dev.resize(132, 43)
    assert con.driver.device_config(0, 4) == 132 | 43 << 16
    assert router.fired == [0]


def test_console_hostile_receive_chain(con: Console) -> None:
    con.probe()
    buf = con.alloc.alloc(8)
    con.rx.write_desc(0, buf, 8, VIRTQ_DESC_F_NEXT, 0)
    con.rx.publish(0)
    con.dev.enqueue_input(b"hi")
    assert con.driver.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET


def test_console_state(con: Console, mem: GuestMemoryMmap, router: FakeRouter) -> None:
    con.probe()
    con.dev.enqueue_input(b"pending")
    state = con.pci.state()
    assert state.device == VirtioConsoleState(80, 25, b"pending", 0, 0)
    clone_out: list[bytes] = []
    clone = VirtioPciDevice(VirtioConsole(out=clone_out.append), mem, FakeRouter())
    clone.restore(state)
    assert clone.state() == state
    buf = con.alloc.alloc(16)
    head = con.rx.add([(buf, 16, True)])
    clone.notify(0)
    assert con.rx.take_used() == [(head, 7)] and mem.read(buf, 7) == b"pending"
    clone.close()
    with pytest.raises(DeviceStateError):
        VirtioConsole().restore(VirtioConsoleState(pending_input=b"x" * (MAX_PENDING_INPUT + 1)))
