"""Tiny PVH "kernels" for launcher tests: a few bytes of 32-bit code that talk to the
serial port, the debug console and the ACPI sleep/reset port, so ``vmsh launch`` can be
checked end to end without Linux."""

from __future__ import annotations

import struct

from tests.kernel_images import make_elf

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


def _read_cmos_seconds() -> bytes:
    """in al <- CMOS register 0 (seconds)."""
    return (b"\xba" + struct.pack("<I", 0x70) + b"\xb0\x00\xee"  # mov edx, 0x70; mov al, 0; out dx, al
            + b"\xba" + struct.pack("<I", 0x71) + b"\xec")  # mov edx, 0x71; in al, dx


def letters() -> bytes:
    """Prints a, b, c, ... z, a, ... one letter a second (paced by the CMOS clock), forever.

    The letter lives in ebx, so a restored VM goes on with the letter after the last one.
    """
    code = b"\xbb\x00\x00\x00\x00"  # mov ebx, 0
    loop = (
        b"\x89\xd8"  # mov eax, ebx
        + b"\x04\x61"  # add al, 'a'
        + b"\xba" + struct.pack("<I", 0x3F8) + b"\xee"  # mov edx, 0x3f8; out dx, al
        + b"\x43"  # inc ebx
        + b"\x83\xfb\x1a\x75\x02\x31\xdb"  # cmp ebx, 26; jne +2; xor ebx, ebx
        + _read_cmos_seconds() + b"\x88\xc1"  # mov cl, al
    )
    wait = _read_cmos_seconds() + b"\x38\xc8"  # cmp al, cl
    wait += b"\x74" + bytes([(256 - (len(wait) + 2)) & 0xFF])  # je wait
    body = loop + wait
    jump_back = b"\xe9" + struct.pack("<i", -(len(body) + 5))  # jmp loop
    return kernel(code + body + jump_back)


def late_echo(seconds: int) -> bytes:
    """Prints ``ready``, reads nothing for ``seconds`` seconds (counted on the CMOS clock), then
    prints ``reading`` and echoes every input byte forever: a guest that boots slowly and does
    not read its console meanwhile."""
    assert 0 < seconds < 128
    code = _out_string(0x3F8, b"ready\n") + b"\xbe" + struct.pack("<I", seconds)  # mov esi, seconds
    tick = _read_cmos_seconds() + b"\x88\xc1"  # mov cl, al
    wait = _read_cmos_seconds() + b"\x38\xc8"  # cmp al, cl
    wait += b"\x74" + bytes([(256 - (len(wait) + 2)) & 0xFF])  # je wait
    count = b"\x4e"  # dec esi
    body = tick + wait + count
    body += b"\x75" + bytes([(256 - (len(body) + 2)) & 0xFF])  # jnz tick
    code += body + _out_string(0x3F8, b"reading\n")
    echo_back = b"\xeb" + bytes([(256 - (len(ECHO_ONE) + 2)) & 0xFF])  # jmp echo
    return kernel(code + ECHO_ONE + echo_back)
