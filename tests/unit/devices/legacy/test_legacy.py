"""i8042 reset, POST port and debug console models."""

from __future__ import annotations

import logging

import pytest

from tests.unit.fakes import FakeTrigger
from vmsh.devices.legacy.debugcon import DebugConsole
from vmsh.devices.legacy.i8042 import COMMAND_OFFSET, I8042
from vmsh.devices.legacy.post import PostPort, code_range


def test_i8042_reset_command_fires_the_trigger() -> None:
    trig = FakeTrigger()
    dev = I8042(trig)
    dev.write(COMMAND_OFFSET, b"\xfe")
    assert trig.count == 1


def test_i8042_other_writes_and_reads_are_inert() -> None:
    trig = FakeTrigger()
    dev = I8042(trig)
    dev.write(COMMAND_OFFSET, b"\xaa")
    dev.write(0, b"\xfe")
    assert trig.count == 0
    assert dev.read(COMMAND_OFFSET, 1) == b"\x00"


@pytest.mark.parametrize("code,name", [(0x01, "Firmware"), (0x20, "Bootloader"), (0x41, "Kernel"),
                                       (0x60, "Userspace"), (0x80, "Custom"), (0xFF, "Custom")])
def test_post_code_ranges(code: int, name: str) -> None:
    assert code_range(code) == name


def test_post_port_logs_code_and_time(caplog: pytest.LogCaptureFixture) -> None:
    t = iter([10.0, 11.5])
    dev = PostPort(verbose=True, clock=lambda: next(t))
    with caplog.at_level(logging.WARNING):
        dev.write(0, b"\x41")
    assert "[Debug I/O port: Kernel code 0x41] 1.500000 seconds" in caplog.text
    assert dev.read(0, 1) == b"\x41"


def test_debug_console_passes_bytes_and_reads_e9() -> None:
    out: list[bytes] = []
    dev = DebugConsole(out.append)
    dev.write(0, b"ok")
    assert out == [b"ok"]
    assert dev.read(0, 1) == b"\xe9"
