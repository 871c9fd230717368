"""A 16550A UART register model (the ``__serial`` console at I/O 0x3f8, IRQ 4).

Guest writes to THR go out through an output callback, bytes from the host go into a 64-byte
receive FIFO, and interrupts are raised through an injected ``Trigger`` (the engine decides
whether that is an irqfd on GSI 4 or something else). Only what a Linux ``8250`` driver and a
polling boot loader need is modelled: there is no baud-rate timing, a transmitted byte leaves
at once, so THR is always empty again right after a write.

Register map and bits: PC16550D datasheet (National Semiconductor, 1995) §8, "Registers";
the driver side is linux drivers/tty/serial/8250/8250_port.c (autoconfig: the FCR/IIR FIFO
check, the MCR loopback check).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vmsh.devices.base import Trigger
from vmsh.devices.state import check_bits, check_max_length, expect_state
from vmsh.state_types import U8

LOG = logging.getLogger(__name__)

# Register offsets from the base port (datasheet Table II).
DATA_OFFSET = 0  # RBR on read, THR on write; DLL when LCR.DLAB=1
IER_OFFSET = 1  # interrupt enable; DLM when LCR.DLAB=1
IIR_OFFSET = 2  # interrupt identification on read
FCR_OFFSET = 2  # FIFO control on write
LCR_OFFSET = 3  # line control
MCR_OFFSET = 4  # modem control
LSR_OFFSET = 5  # line status
MSR_OFFSET = 6  # modem status
SCR_OFFSET = 7  # scratch

# IER bits (§8.4)
IER_RDA_BIT = 0x01  # received data available
IER_THR_EMPTY_BIT = 0x02  # transmitter holding register empty
IER_RLS_BIT = 0x04  # receiver line status
IER_MS_BIT = 0x08  # modem status
IER_MASK = 0x0F  # bits 4-7 are always 0 on a 16550A

# IIR values (§8.5, Table IV); bits 6-7 read 1 when the FIFOs are enabled (FCR bit 0)
IIR_NONE_BIT = 0x01  # no interrupt pending
IIR_THR_EMPTY = 0x02  # priority 3: THR empty
IIR_RDA = 0x04  # priority 2: received data available
IIR_FIFO_BITS = 0xC0  # "FIFOs enabled": what 8250 autoconfig reads to detect a 16550A

# FCR bits (§8.6)
FCR_FIFO_ENABLE_BIT = 0x01
FCR_CLEAR_RX_BIT = 0x02
FCR_CLEAR_TX_BIT = 0x04

# LCR bits (§8.7)
LCR_DLAB_BIT = 0x80  # divisor latch access

# MCR bits (§8.8)
MCR_DTR_BIT = 0x01
MCR_RTS_BIT = 0x02
MCR_OUT1_BIT = 0x04
MCR_OUT2_BIT = 0x08
MCR_LOOP_BIT = 0x10  # local loopback: THR feeds RBR, MCR bits feed MSR
MCR_MASK = 0x1F

# LSR bits (§8.9)
LSR_DATA_READY_BIT = 0x01
LSR_OVERRUN_BIT = 0x02
LSR_THR_EMPTY_BIT = 0x20
LSR_IDLE_BIT = 0x40  # TEMT: transmitter empty
DEFAULT_LINE_STATUS = LSR_THR_EMPTY_BIT | LSR_IDLE_BIT

# MSR bits (§8.10): delta bits 0-3, line states 4-7
MSR_CTS_BIT = 0x10
MSR_DSR_BIT = 0x20
MSR_RI_BIT = 0x40
MSR_DCD_BIT = 0x80
DEFAULT_MODEM_STATUS = MSR_DSR_BIT | MSR_CTS_BIT | MSR_DCD_BIT

#: 115200 baud from the 1.8432 MHz clock: divisor 1; cloud-hypervisor and Firecracker start at 12
DEFAULT_BAUD_DIVISOR = 12
#: receive FIFO depth of a 16550A (§1, "16-byte FIFOs"); 64 like vm-superio to absorb pastes
FIFO_SIZE = 64


@dataclass(frozen=True, slots=True)
class SerialState:
    """Plain-data state of a ``Serial16550`` (for snapshots; checked by ``restore``)."""

    baud_divisor_low: U8 = DEFAULT_BAUD_DIVISOR
    baud_divisor_high: U8 = 0
    interrupt_enable: U8 = 0
    thr_empty_pending: bool = False
    fifo_control: U8 = 0
    line_control: U8 = 0x03  # 8N1
    line_status: U8 = DEFAULT_LINE_STATUS
    modem_control: U8 = MCR_OUT2_BIT
    modem_status: U8 = DEFAULT_MODEM_STATUS
    scratch: U8 = 0
    in_buffer: bytes = b""


class Serial16550:
    """The UART registers, relative to the base port.

    :param trigger: raised whenever a new enabled interrupt condition appears.
    :param out: called with each transmitted byte (as a 1-byte ``bytes``).

    Example::

        uart = Serial16550(trigger, out=sys.stdout.buffer.write)
        uart.write(DATA_OFFSET, b"A")   # -> out(b"A")
    """

    state_type = SerialState

    def __init__(self, trigger: Trigger, out: Callable[[bytes], object] | None = None) -> None:
        s = SerialState()  # the power-on registers
        self.trigger = trigger
        self.out = out
        self.dll = s.baud_divisor_low
        self.dlm = s.baud_divisor_high
        self.ier = s.interrupt_enable
        self.thr_empty_pending = s.thr_empty_pending
        self.fcr = s.fifo_control
        self.lcr = s.line_control
        self.lsr = s.line_status
        self.mcr = s.modem_control
        self.msr = s.modem_status
        self.scr = s.scratch
        self.rx: deque[int] = deque(s.in_buffer)
        #: bytes transmitted and bytes dropped on a full FIFO (for counters)
        self.tx_count = 0
        self.rx_dropped = 0

    # -- snapshot ------------------------------------------------------------------------

    def state(self) -> SerialState:
        """The current state as plain data."""
        return SerialState(self.dll, self.dlm, self.ier, self.thr_empty_pending, self.fcr, self.lcr,
                           self.lsr, self.mcr, self.msr, self.scr, bytes(self.rx))

    def restore(self, state: SerialState) -> None:
        """Load ``state`` (untrusted) in place, re-raising any interrupt it leaves pending.

        :raises DeviceStateError: for another state class, a register wider than its bits or
            a receive FIFO over ``FIFO_SIZE`` bytes; the UART is then unchanged.
        """
        s = expect_state(state, SerialState)
        check_bits("interrupt_enable", s.interrupt_enable, IER_MASK)
        check_bits("modem_control", s.modem_control, MCR_MASK)
        check_max_length("in_buffer", s.in_buffer, FIFO_SIZE)
        self.dll, self.dlm = s.baud_divisor_low, s.baud_divisor_high
        self.ier = s.interrupt_enable
        self.thr_empty_pending = s.thr_empty_pending
        self.fcr, self.lcr, self.lsr = s.fifo_control, s.line_control, s.line_status
        self.mcr, self.msr, self.scr = s.modem_control, s.modem_status, s.scratch
        self.rx = deque(s.in_buffer)
        if self.rx:
            self.lsr |= LSR_DATA_READY_BIT
        if self._pending_iir() != IIR_NONE_BIT:
            self.trigger.trigger()

    # -- host side -------------------------------------------------------------------------

    def enqueue_raw_bytes(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes fit in the FIFO."""
        room = FIFO_SIZE - len(self.rx)
        accepted = data[:max(room, 0)]
        if not accepted:
            return 0
        self.rx.extend(accepted)
        self.lsr |= LSR_DATA_READY_BIT
        if self.ier & IER_RDA_BIT:
            self.trigger.trigger()
        return len(accepted)

    def fifo_capacity(self) -> int:
        """Free room in the receive FIFO."""
        return FIFO_SIZE - len(self.rx)

    # -- guest side ------------------------------------------------------------------------

    def _pending_iir(self) -> int:
        # Priority order, datasheet Table IV: line status, RDA, THRE, modem status.
        if self.ier & IER_RDA_BIT and self.rx:
            return IIR_RDA
        if self.ier & IER_THR_EMPTY_BIT and self.thr_empty_pending:
            return IIR_THR_EMPTY
        return IIR_NONE_BIT

    def read(self, offset: int, size: int) -> bytes:
        """Read a register (only the first byte of a wider access is meaningful)."""
        return bytes([self._read8(offset)]) + b"\x00" * (size - 1)

    def _read8(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB_BIT
        if offset == DATA_OFFSET:
            if dlab:
                return self.dll
            if not self.rx:
                return 0
            byte = self.rx.popleft()
            if not self.rx:
                self.lsr &= ~LSR_DATA_READY_BIT
            return byte
        if offset == IER_OFFSET:
            return self.dlm if dlab else self.ier
        if offset == IIR_OFFSET:
            iir = self._pending_iir()
            if iir == IIR_THR_EMPTY:
                # Reading IIR with THRE as the source clears it (datasheet Table IV, reset column).
                self.thr_empty_pending = False
            return iir | (IIR_FIFO_BITS if self.fcr & FCR_FIFO_ENABLE_BIT else 0)
        if offset == LCR_OFFSET:
            return self.lcr
        if offset == MCR_OFFSET:
            return self.mcr
        if offset == LSR_OFFSET:
            lsr = self.lsr
            self.lsr &= ~LSR_OVERRUN_BIT  # error bits clear on read (§8.9)
            return lsr
        if offset == MSR_OFFSET:
            if self.mcr & MCR_LOOP_BIT:
                # Loopback wires RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD (§8.8 bit 4).
                m = self.mcr
                return ((MSR_CTS_BIT if m & MCR_RTS_BIT else 0) | (MSR_DSR_BIT if m & MCR_DTR_BIT else 0)
                        | (MSR_RI_BIT if m & MCR_OUT1_BIT else 0) | (MSR_DCD_BIT if m & MCR_OUT2_BIT else 0))
            return self.msr
        if offset == SCR_OFFSET:
            return self.scr
        return 0

    def write(self, offset: int, data: bytes) -> None:
        """Write a register (only the first byte of a wider access is used)."""
        if not data:
            return
        value = data[0]
        dlab = self.lcr & LCR_DLAB_BIT
        if offset == DATA_OFFSET:
            if dlab:
                self.dll = value
            elif self.mcr & MCR_LOOP_BIT:
                if len(self.rx) < FIFO_SIZE:
                    self.rx.append(value)
                    self.lsr |= LSR_DATA_READY_BIT
                else:
                    self.lsr |= LSR_OVERRUN_BIT
                self._transmitted()
            else:
                self.tx_count += 1
                if self.out is not None:
                    try:
                        self.out(bytes([value]))
                    except OSError as err:
                        LOG.warning("serial output failed: %s", err)
                self._transmitted()
        elif offset == IER_OFFSET:
            if dlab:
                self.dlm = value
                return
            old = self.ier
            self.ier = value & IER_MASK
            # Enabling THRE while THR is empty raises it at once (8250_port.c relies on it in
            # serial8250_start_tx); enabling RDA with data queued likewise.
            if self.ier & IER_THR_EMPTY_BIT and not old & IER_THR_EMPTY_BIT:
                self.thr_empty_pending = True
            if self._pending_iir() != IIR_NONE_BIT:
                self.trigger.trigger()
        elif offset == FCR_OFFSET:
            self.fcr = value
            if value & FCR_CLEAR_RX_BIT:
                self.rx.clear()
                self.lsr &= ~LSR_DATA_READY_BIT
        elif offset == LCR_OFFSET:
            self.lcr = value
        elif offset == MCR_OFFSET:
            self.mcr = value & MCR_MASK
        elif offset == SCR_OFFSET:
            self.scr = value
        # LSR and MSR writes are ignored ("factory test" only, §8.9).

    def _transmitted(self) -> None:
        # The byte left instantly, so THR is empty again: LSR keeps THRE|TEMT and the THRE
        # interrupt becomes pending.
        self.thr_empty_pending = True
        if self.ier & IER_THR_EMPTY_BIT:
            self.trigger.trigger()
