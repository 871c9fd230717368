"""The CMOS real-time clock and NVRAM at I/O 0x70 (index) and 0x71 (data).

The clock reads the host's UTC time plus an offset that a guest write of the time adjusts,
so ``hwclock --systohc`` in the guest works without touching the host. Register layout and
bits: Motorola MC146818A datasheet ("Address map", registers A-D); the memory-size bytes are
the PC/AT BIOS convention Linux and firmware read (0x34/0x35: RAM between 16 MiB and 4 GiB in
64 KiB units; 0x5b-0x5d: RAM above 4 GiB in 64 KiB units). No alarm or periodic interrupts.
"""

from __future__ import annotations

import calendar
import dataclasses
import logging
import time
from collections.abc import Callable

from vmsh.devices.base import Trigger
from vmsh.devices.state import check_length, check_range, expect_state
from vmsh.state_types import S64

LOG = logging.getLogger(__name__)

INDEX_OFFSET = 0  # port 0x70; bit 7 is the NMI mask, not part of the index
DATA_OFFSET = 1  # port 0x71
INDEX_MASK = 0x7F

SECONDS, MINUTES, HOURS = 0x00, 0x02, 0x04
WEEKDAY, DAY, MONTH, YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
SHUTDOWN_STATUS = 0x0F
#: Linux's real-mode restart writes 0 to the shutdown status with NMIs masked (index 0x8f);
#: its SMP bring-up writes 0 to plain 0x0f to clear the warm-reset code, which is no reset.
RESET_INDEX = 0x80 | SHUTDOWN_STATUS
CENTURY = 0x32
MEM_16M_LOW, MEM_16M_HIGH = 0x34, 0x35
MEM_4G_LOW, MEM_4G_MID, MEM_4G_HIGH = 0x5B, 0x5C, 0x5D

REG_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) never set
REG_B_24H = 0x02  # 24-hour mode
REG_B_BINARY = 0x04  # DM: binary instead of BCD
REG_B_SET = 0x80  # the guest is setting the clock
REG_B_DEFAULT = REG_B_24H  # BCD, 24 h, like PC firmware leaves it
REG_D_VRT = 0x80  # valid RAM and time
TIME_REGS = (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY)


#: bytes of register file and NVRAM
NVRAM_SIZE = 128


@dataclasses.dataclass(frozen=True, slots=True)
class CmosState:
    """Everything the guest can change: the selected index, NVRAM, the clock offset."""

    index: int
    nvram: bytes
    offset_seconds: S64


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0xF)


class Cmos:
    """MC146818-compatible RTC plus 128 bytes of NVRAM.

    :param mem_below_4g: guest RAM below 4 GiB in bytes (for 0x34/0x35).
    :param mem_above_4g: guest RAM above 4 GiB in bytes (for 0x5b-0x5d).
    :param reset: triggered by the BIOS shutdown-status reset convention (0 to index 0x0f).
    """

    state_type = CmosState

    def __init__(self, mem_below_4g: int, mem_above_4g: int, reset: Trigger | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.index = 0
        self.raw_index = 0
        self.nvram = bytearray(NVRAM_SIZE)
        self.offset_seconds = 0
        self.reset = reset
        self._clock = clock
        self.nvram[REG_A] = REG_A_DEFAULT
        self.nvram[REG_B] = REG_B_DEFAULT
        self.nvram[REG_D] = REG_D_VRT
        above_16m = max(0, min(mem_below_4g, 0xFFFF_FFFF) - (16 << 20)) >> 16
        above_16m = min(above_16m, 0xFFFF)
        self.nvram[MEM_16M_LOW], self.nvram[MEM_16M_HIGH] = above_16m & 0xFF, above_16m >> 8
        above_4g = min(mem_above_4g >> 16, 0xFF_FFFF)
        self.nvram[MEM_4G_LOW] = above_4g & 0xFF
        self.nvram[MEM_4G_MID] = (above_4g >> 8) & 0xFF
        self.nvram[MEM_4G_HIGH] = above_4g >> 16

    def state(self) -> CmosState:
        return CmosState(index=self.index, nvram=bytes(self.nvram), offset_seconds=self.offset_seconds)

    def restore(self, state: CmosState) -> None:
        """Load ``state`` (untrusted) in place; the saved NVRAM, memory-size bytes included, wins.

        :raises DeviceStateError: for another state class, an index over 0x7f, NVRAM that is not
            128 bytes or a clock offset beyond 64 bits.
        """
        s = expect_state(state, CmosState)
        check_range("index", s.index, 0, INDEX_MASK)
        check_length("nvram", s.nvram, NVRAM_SIZE)
        self.index = self.raw_index = s.index
        self.nvram[:] = s.nvram
        self.offset_seconds = s.offset_seconds

    def _encode(self, value: int) -> int:
        return value if self.nvram[REG_B] & REG_B_BINARY else _bcd(value)

    def _decode(self, value: int) -> int:
        return value if self.nvram[REG_B] & REG_B_BINARY else _from_bcd(value)

    def _time_fields(self) -> dict[int, int]:
        t = time.gmtime(int(self._clock()) + self.offset_seconds)
        return {
            SECONDS: t.tm_sec, MINUTES: t.tm_min, HOURS: t.tm_hour, WEEKDAY: (t.tm_wday + 1) % 7 + 1,
            DAY: t.tm_mday, MONTH: t.tm_mon, YEAR: t.tm_year % 100, CENTURY: t.tm_year // 100,
        }

    def read(self, offset: int, size: int) -> bytes:
        if offset != DATA_OFFSET:
            return bytes(size)
        if self.index in TIME_REGS and not self.nvram[REG_B] & REG_B_SET:
            value = self._encode(self._time_fields()[self.index])
        elif self.index == REG_C:
            value = 0  # no interrupt flags: alarms and periodic interrupts are not modelled
        else:
            value = self.nvram[self.index]
        return bytes([value]) * size

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = data[0]
        if offset == INDEX_OFFSET:
            self.raw_index = value
            self.index = value & INDEX_MASK
            return
        if offset != DATA_OFFSET:
            return
        if self.index in TIME_REGS:
            fields = self._time_fields()
            fields[self.index] = self._decode(value)
            self._set_time(fields)
        elif self.index == REG_B:
            self.nvram[REG_B] = value
        elif self.index in (REG_C, REG_D):
            pass  # read-only
        elif self.raw_index == RESET_INDEX and value == 0 and self.reset is not None:
            LOG.info("cmos: guest requested a reset")
            self.reset.trigger()
        else:
            self.nvram[self.index] = value

    def _set_time(self, f: dict[int, int]) -> None:
        try:
            target = calendar.timegm((f[CENTURY] * 100 + f[YEAR], f[MONTH], f[DAY], f[HOURS], f[MINUTES], f[SECONDS]))
        except (ValueError, OverflowError):
            LOG.debug("cmos: ignoring an invalid time write")
            return
        self.offset_seconds = target - int(self._clock())
