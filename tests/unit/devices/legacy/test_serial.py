"""Serial16550 register model: output, input FIFO, interrupts, loopback, state round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.unit.fakes import FakeTrigger
from vmsh.devices.legacy import serial as s
from vmsh.devices.legacy.serial import Serial16550, SerialState
from vmsh.errors import DeviceStateError


def make() -> tuple[Serial16550, FakeTrigger, list[bytes]]:
    trig, out = FakeTrigger(), []
    return Serial16550(trig, out.append), trig, out


def test_serial_thr_write_goes_to_output() -> None:
    uart, _, out = make()
    for c in b"hi":
        uart.write(s.DATA_OFFSET, bytes([c]))
    assert out == [b"h", b"i"]
    assert uart.tx_count == 2


def test_serial_lsr_defaults_to_transmitter_empty() -> None:
    uart, _, _ = make()
    assert uart.read(s.LSR_OFFSET, 1)[0] == s.LSR_THR_EMPTY_BIT | s.LSR_IDLE_BIT


def test_serial_dlab_switches_data_and_ier_to_the_divisor() -> None:
    uart, _, out = make()
    uart.write(s.LCR_OFFSET, bytes([s.LCR_DLAB_BIT | 3]))
    uart.write(s.DATA_OFFSET, b"\x01")
    uart.write(s.IER_OFFSET, b"\x00")
    assert uart.read(s.DATA_OFFSET, 1) == b"\x01" and out == []
    uart.write(s.LCR_OFFSET, b"\x03")
    assert uart.read(s.IER_OFFSET, 1) == b"\x00"
    assert uart.state().baud_divisor_low == 1


def test_serial_enabling_thre_interrupt_fires_and_iir_reports_it_once() -> None:
    uart, trig, _ = make()
    uart.write(s.IER_OFFSET, bytes([s.IER_THR_EMPTY_BIT]))
    assert trig.count == 1
    assert uart.read(s.IIR_OFFSET, 1)[0] == s.IIR_THR_EMPTY
    assert uart.read(s.IIR_OFFSET, 1)[0] == s.IIR_NONE_BIT  # reading IIR cleared it


def test_serial_write_with_thre_enabled_triggers() -> None:
    uart, trig, _ = make()
    uart.write(s.IER_OFFSET, bytes([s.IER_THR_EMPTY_BIT]))
    uart.write(s.DATA_OFFSET, b"x")
    assert trig.count == 2


def test_serial_no_interrupt_when_disabled() -> None:
    uart, trig, _ = make()
    uart.write(s.DATA_OFFSET, b"x")
    uart.enqueue_raw_bytes(b"abc")
    assert trig.count == 0
    assert uart.read(s.IIR_OFFSET, 1)[0] == s.IIR_NONE_BIT


def test_serial_input_sets_data_ready_and_raises_rda() -> None:
    uart, trig, _ = make()
    uart.write(s.IER_OFFSET, bytes([s.IER_RDA_BIT]))
    assert uart.enqueue_raw_bytes(b"ok") == 2
    assert trig.count == 1
    assert uart.read(s.LSR_OFFSET, 1)[0] & s.LSR_DATA_READY_BIT
    assert uart.read(s.IIR_OFFSET, 1)[0] == s.IIR_RDA
    assert uart.read(s.DATA_OFFSET, 1) == b"o"
    assert uart.read(s.DATA_OFFSET, 1) == b"k"
    assert not uart.read(s.LSR_OFFSET, 1)[0] & s.LSR_DATA_READY_BIT
    assert uart.read(s.IIR_OFFSET, 1)[0] == s.IIR_NONE_BIT


def test_serial_fifo_is_bounded() -> None:
    uart, _, _ = make()
    assert uart.enqueue_raw_bytes(bytes(100)) == s.FIFO_SIZE
    assert uart.enqueue_raw_bytes(b"x") == 0


def test_serial_fifo_enable_shows_in_iir_as_16550a() -> None:
    uart, _, _ = make()
    uart.write(s.FCR_OFFSET, bytes([s.FCR_FIFO_ENABLE_BIT]))
    # drivers/tty/serial/8250/8250_port.c autoconfig: IIR bits 7:6 == 3 means a 16550A
    assert uart.read(s.IIR_OFFSET, 1)[0] >> 6 == 3


def test_serial_fcr_clears_the_receive_fifo() -> None:
    uart, _, _ = make()
    uart.enqueue_raw_bytes(b"abc")
    uart.write(s.FCR_OFFSET, bytes([s.FCR_FIFO_ENABLE_BIT | s.FCR_CLEAR_RX_BIT]))
    assert not uart.read(s.LSR_OFFSET, 1)[0] & s.LSR_DATA_READY_BIT


def test_serial_loopback_feeds_rbr_and_msr() -> None:
    uart, _, out = make()
    uart.write(s.MCR_OFFSET, bytes([s.MCR_LOOP_BIT | s.MCR_OUT2_BIT | s.MCR_RTS_BIT]))
    # 8250 autoconfig's loopback check expects CTS|DCD = 0x90
    assert uart.read(s.MSR_OFFSET, 1)[0] & 0xF0 == 0x90
    uart.write(s.DATA_OFFSET, b"z")
    assert out == []
    assert uart.read(s.DATA_OFFSET, 1) == b"z"


def test_serial_scratch_register_holds_a_byte() -> None:
    uart, _, _ = make()
    uart.write(s.SCR_OFFSET, b"\xa5")
    assert uart.read(s.SCR_OFFSET, 1) == b"\xa5"


def test_serial_wide_read_is_padded() -> None:
    uart, _, _ = make()
    assert len(uart.read(s.LSR_OFFSET, 4)) == 4


def test_serial_state_round_trips_through_json() -> None:
    uart, _, _ = make()
    uart.write(s.IER_OFFSET, bytes([s.IER_RDA_BIT]))
    uart.write(s.SCR_OFFSET, b"\x42")
    uart.enqueue_raw_bytes(b"in")
    state = uart.state()
    raw = json.loads(json.dumps({k: (v.hex() if isinstance(v, bytes) else v)
                                 for k, v in dataclasses.asdict(state).items()}))
    raw["in_buffer"] = bytes.fromhex(raw["in_buffer"])
    back = SerialState(**raw)
    assert back == state
    trig = FakeTrigger()
    uart2 = Serial16550(trig)
    uart2.restore(back)
    assert uart2.state() == state
    assert trig.count == 1  # the pending RDA interrupt fires again on restore
    assert uart2.read(s.DATA_OFFSET, 1) == b"i"


def test_serial_restore_rejects_an_oversized_fifo() -> None:
    with pytest.raises(DeviceStateError, match="in_buffer: has 65 entries"):
        Serial16550(FakeTrigger()).restore(SerialState(in_buffer=bytes(s.FIFO_SIZE + 1)))


def test_serial_restore_rejects_out_of_range_registers() -> None:
    with pytest.raises(DeviceStateError, match=r"line_control: 256 is out of range 0\.\.255"):
        Serial16550(FakeTrigger()).restore(SerialState(line_control=0x100))
