"""Tiny PVH "kernels" for launcher tests: a few bytes of 32-bit code that talk to the
serial port, the debug console and the ACPI sleep/reset port, so ``vmsh launch`` can be
checked end to end without Linux."""

from __future__ import annotations

import struct

from tests.unit.test_loader import make_elf

LOAD_ADDR = 0x1000000


def _out_string(port: int, text: bytes) -> bytes:
    code = b"\xba" + struct.pack("<I", port)  # mov edx, port
    for byte in text:
        code += bytes([0xB0, byte, 0xEE])  # mov al, byte; out dx, al
    return code


def _acpi_write(value: int) -> bytes:
    return b"\xba" + struct.pack("<I", 0x600) + bytes([0xB0, value, 0xEE])


SPIN = b"\xeb\xfe"  # jmp $

#: wait for a byte on the serial port (LSR data ready) and echo it back
ECHO_ONE = (
    b"\xba" + struct.pack("<I", 0x3FD)  # mov edx, 0x3fd (LSR)
    + b"\xec"  # wait: in al, dx
    + b"\xa8\x01"  # test al, 1
    + b"\x74\xfb"  # jz wait
    + b"\xba" + struct.pack("<I", 0x3F8)  # mov edx, 0x3f8
    + b"\xec\xee"  # in al, dx; out dx, al
)


def kernel(code: bytes) -> bytes:
    """A PVH ELF whose entry runs ``code`` (32-bit protected mode, paging off)."""
    return make_elf(entry_note=LOAD_ADDR, paddr=LOAD_ADDR, code=code)


def hello_poweroff() -> bytes:
    """Prints ``hello`` on the serial port and ``dbg`` on port 0xe9, then powers off."""
    return kernel(_out_string(0x3F8, b"hello\n") + _out_string(0xE9, b"dbg") + _acpi_write(0x34) + SPIN)


def echo_poweroff() -> bytes:
    """Prints ``ready``, echoes one input byte after ``got:``, then powers off."""
    return kernel(_out_string(0x3F8, b"ready\n") + _out_string(0x3F8, b"got:") + ECHO_ONE
                  + _out_string(0x3F8, b"\n") + _acpi_write(0x34) + SPIN)


def reset_loop() -> bytes:
    """Prints ``boot`` and asks for a reset: every boot is followed by a reboot."""
    return kernel(_out_string(0x3F8, b"boot\n") + _acpi_write(0x01) + SPIN)
