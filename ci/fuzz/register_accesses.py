"""The register campaign's accesses (``fuzz_registers.py``): chunks of port and MMIO accesses
made from one seeded ``random.Random`` and what is known of the machine's layout, and the rings
laid out in guest RAM for the devices to chew on."""

from __future__ import annotations

import mmap
import random
import struct
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ci.fuzz.register_machine import (
    ARENA,
    COMMON,
    DEVICE_CFG,
    ECAM,
    GED,
    ISR,
    KVM_MMIO,
    KVM_PORTS,
    LEGACY_PORTS,
    MMIO32,
    MSIX_PBA,
    MSIX_TABLE,
    NOTIFY,
    OP_IN,
    OP_INS,
    OP_OUT,
    OP_OUTS,
    OP_READ,
    OP_WRITE,
    PCI_HOTPLUG,
    STATUS_ACK,
    STATUS_DRIVER,
    STATUS_FEATURES_OK,
    Device,
)

# --- the generator --------------------------------------------------------------------------------

#: (op, size, address, value); for rep outs/ins the op carries the count in bits 8-23 and the value
#: is the guest address of the buffer
Access = tuple[int, int, int, int]


class Generator:
    """Chunks of accesses from one seeded ``random.Random`` and what is known of the layout."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.devices: list[Device] = []
        self.original: dict[str, int] = {}
        self.regions: list[int] = []
        #: capabilities found by walking each device's list: (segment, slot) -> {offset: cap id}
        self.caps: dict[tuple[int, int], dict[int, int]] = {}
        #: where each virtio function's PCI_CFG capability is (virtio 1.2 §4.1.4.9)
        self.pci_cfg: dict[tuple[int, int], int] = {}
        #: the features each virtio device offers and its number of queues (read by the probe)
        self.features: dict[str, int] = {}
        self.num_queues: dict[str, int] = {}
        self.classes: Counter[str] = Counter()

    # -- values --

    def value(self, size: int) -> int:
        r = self.rnd.random()
        mask = (1 << 8 * size) - 1
        if r < 0.35:
            return self.rnd.getrandbits(8 * size)
        if r < 0.55:
            return self.rnd.choice((0, 1, 2, 3, 4, 7, 8, 0xF, 0x10, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF,
                                    0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 63, mask)) & mask
        if r < 0.75:
            return self.rnd.randrange(0, 64)
        if r < 0.9:
            return self.arena_address() & mask
        return (self.rnd.choice(self.regions) + self.rnd.randrange(0, 1 << 30)) & mask if self.regions else 0

    def arena_address(self, align: int = 16) -> int:
        return self.rnd.randrange(ARENA[0], ARENA[1] - 0x10000) & ~(align - 1)

    def size(self, allowed: tuple[int, ...] = (1, 2, 4, 8)) -> int:
        return self.rnd.choice(allowed)

    # -- layout --

    def set_layout(self, devices: list[Device]) -> None:
        self.devices = devices
        for d in devices:
            self.original.setdefault(d.id, d.base)

    def mapped(self, address: int, size: int) -> bool:
        if address + size <= 1 << 32:
            return True
        return any(b <= address and address + size <= b + (1 << 30) for b in self.regions)

    def ecam(self, segment: int, slot: int, register: int, function: int = 0, bus: int = 0) -> int:
        return ECAM + (segment << 20) + (bus << 20 if segment == 0 and bus else 0) \
            + (slot << 15) + (function << 12) + register

    # -- accesses --

    def chunk(self, count: int) -> list[Access]:
        out: list[Access] = []
        kinds = ("port", "cf8", "ecam", "bar", "virtio-activate", "bar-move", "platform-mmio", "random-mmio",
                 "random-port", "reset", "pci-cfg-window")
        weights = (18, 8, 18, 30, 1.5, 2, 4, 8, 8, 0.03, 3)
        while len(out) < count:
            kind = self.rnd.choices(kinds, weights)[0]
            made = getattr(self, "_" + kind.replace("-", "_"))()
            self.classes[kind] += len(made)
            out.extend(made)
        return out[:count]

    def _rw(self, address: int, size: int, port: bool = False, write: bool | None = None) -> Access:
        if write is None:
            write = self.rnd.random() < 0.6
        if port:
            return (OP_OUT if write else OP_IN, size, address, self.value(size) if write else 0)
        return (OP_WRITE if write else OP_READ, size, address, self.value(size) if write else 0)

    def _port(self) -> list[Access]:
        base, length = self.rnd.choice(list(LEGACY_PORTS.values()))
        port = base + self.rnd.randrange(length)
        if self.rnd.random() < 0.05:  # rep outs / rep ins (the vCPU's string I/O path)
            count = self.rnd.choice((1, 2, 16, 64, 255))
            buf = self.arena_address(8)
            op = OP_OUTS if self.rnd.random() < 0.6 else OP_INS
            if op == OP_OUTS and port in (0x600, 0x64, 0x70, 0x71):
                op = OP_INS  # a buffer of arena bytes would reset the VM too often
            return [(op | count << 8, self.size((1, 2, 4)), port, buf)]
        return [self._rw(port, self.size((1, 2, 4)), port=True)]

    def _reset(self) -> list[Access]:
        """Ask for a reset the ways a guest can (the VMM reboots the VM in its process), or,
        rarely, power off (the process ends and the campaign starts a fresh one)."""
        r = self.rnd.random()
        if r < 0.1:
            return [(OP_OUT, 1, 0x600, 0x34)]
        if r < 0.4:
            return [(OP_OUT, 1, 0x600, 0x01)]
        if r < 0.7:
            return [(OP_OUT, 1, 0x64, 0xFE)]
        return [(OP_OUT, 1, 0x70, 0x0F), (OP_OUT, 1, 0x71, 0x00)]

    def _random_port(self) -> list[Access]:
        port = self.rnd.randrange(0x10000)
        while port in KVM_PORTS:
            port = self.rnd.randrange(0x10000)
        return [self._rw(port, self.size((1, 2, 4)), port=True)]

    def _slot(self) -> tuple[int, int]:
        if self.devices and self.rnd.random() < 0.85:
            d = self.rnd.choice(self.devices)
            return d.segment, d.slot
        return self.rnd.randrange(2), self.rnd.randrange(32)

    def _register(self, segment: int, slot: int) -> int:
        caps = self.caps.get((segment, slot), {})
        r = self.rnd.random()
        if r < 0.25:
            return self.rnd.choice((0x04, 0x06, 0x0C, 0x10, 0x14, 0x18, 0x30, 0x3C, 0x3D))
        if r < 0.65 and caps:
            return self.rnd.choice(list(caps)) + self.rnd.randrange(0, 20)
        if r < 0.95:
            return self.rnd.randrange(0x100)
        return self.rnd.randrange(0x1000)

    def _cf8(self) -> list[Access]:
        segment, slot = self._slot()
        register = self._register(0, slot) if segment == 0 else self.rnd.randrange(0x100)
        if self.rnd.random() < 0.9:
            function = self.rnd.randrange(8) if self.rnd.random() < 0.1 else 0
            address = 0x8000_0000 | slot << 11 | function << 8 | (register & 0xFC)
        else:
            address = self.rnd.getrandbits(32)
        size = self.size((1, 2, 4))
        offset = register & 3 if size == 1 else (register & 2 if size == 2 else 0)
        return [(OP_OUT, 4, 0xCF8, address), self._rw(0xCFC + offset, size, port=True)]

    def _ecam(self) -> list[Access]:
        segment, slot = self._slot()
        register = self._register(segment, slot)
        size = self.size((1, 2, 4, 4, 8))
        function = self.rnd.randrange(8) if self.rnd.random() < 0.05 else 0
        bus = self.rnd.randrange(256) if self.rnd.random() < 0.03 else 0
        address = self.ecam(segment, slot, register & 0xFFF, function, bus)
        return [self._rw(address, size)]

    def _bar_device(self) -> Device | None:
        live = [d for d in self.devices if d.base and self.mapped(d.base, d.size)]
        return self.rnd.choice(live) if live else None

    def _bar(self) -> list[Access]:
        d = self._bar_device()
        if d is None:
            return self._bar_move()
        if not d.virtio:
            off = self.rnd.randrange(min(d.size, 0x20)) if self.rnd.random() < 0.9 else self.rnd.randrange(d.size)
            return [self._rw(d.base + off, self.size((1, 2, 4)))]
        r = self.rnd.random()
        size = self.size()
        if r < 0.45:
            off, natural = self.rnd.choice(COMMON)
            size = natural if self.rnd.random() < 0.8 else size
            access = self._rw(d.base + off, size)
            if access[0] == OP_WRITE and off in (0x20, 0x28, 0x30) and self.rnd.random() < 0.7:
                access = (OP_WRITE, 4, d.base + off, self.arena_address(64))
            elif access[0] == OP_WRITE and off in (0x24, 0x2C, 0x34) and self.rnd.random() < 0.7:
                access = (OP_WRITE, 4, d.base + off, 0)
            elif access[0] == OP_WRITE and off == 0x14 and self.rnd.random() < 0.5:
                access = (OP_WRITE, 1, d.base + off, self.rnd.choice((0, 1, 3, 0xB, 0xF, 0x8F, 0x4F, 0x7, 0xFF)))
            return [access]
        if r < 0.5:
            return [self._rw(d.base + ISR, size, write=self.rnd.random() < 0.2)]
        if r < 0.65:
            return [self._rw(d.base + DEVICE_CFG + self.rnd.randrange(0x100 if self.rnd.random() < 0.9 else 0x1000),
                             size)]
        if r < 0.75:
            return [(OP_WRITE, self.size((2, 2, 4, 1)), d.base + NOTIFY + 4 * self.rnd.randrange(8),
                     self.rnd.randrange(8))]
        if r < 0.92:
            off = self.rnd.randrange(16 * 24) if self.rnd.random() < 0.9 else self.rnd.randrange(0x40000)
            access = self._rw(d.base + MSIX_TABLE + off, size)
            if access[0] == OP_WRITE:
                access = (OP_WRITE, size, access[2], _fixed_delivery(off, size, access[3]))
            return [access]
        if r < 0.96:
            return [self._rw(d.base + MSIX_PBA + self.rnd.randrange(0x800), size)]
        edge = d.base + self.rnd.choice((d.size - self.rnd.randrange(1, 8), -self.rnd.randrange(1, 8)))
        if self.rnd.random() < 0.5 and self.mapped(edge, size):  # across the BAR's ends
            return [self._rw(edge, size)]
        return [self._rw(d.base + self.rnd.randrange(d.size - 8), size)]

    def _pci_cfg_window(self) -> list[Access]:
        """BAR 0 through the PCI_CFG capability's window (bar, offset, length, then data): the
        registers again, reached from a configuration write instead of an MMIO exit."""
        if not self.pci_cfg:
            return self._ecam()
        (segment, slot), cap = self.rnd.choice(sorted(self.pci_cfg.items()))
        r = self.rnd.random()
        if r < 0.5:
            offset = self.rnd.choice(COMMON)[0]
        elif r < 0.65:
            offset = NOTIFY + 4 * self.rnd.randrange(4)
        elif r < 0.8:
            offset = MSIX_TABLE + self.rnd.randrange(16 * 12)
        elif r < 0.9:
            offset = DEVICE_CFG + self.rnd.randrange(0x40)
        else:
            offset = self.rnd.getrandbits(32 if self.rnd.random() < 0.3 else 19)
        length = self.rnd.choice((1, 2, 4, 4, 0, 3, 8, self.rnd.getrandbits(32)))
        out: list[Access] = [
            (OP_WRITE, 1, self.ecam(segment, slot, cap + 4), 0 if self.rnd.random() < 0.9 else self.rnd.randrange(256)),
            (OP_WRITE, 4, self.ecam(segment, slot, cap + 8), offset),
            (OP_WRITE, 4, self.ecam(segment, slot, cap + 12), length)]
        size = self.size((1, 2, 4, 4))
        data = self.ecam(segment, slot, cap + 16)
        if self.rnd.random() < 0.6:
            value = self.value(size)
            if MSIX_TABLE <= offset < MSIX_TABLE + 0x40000:
                value = _fixed_delivery(offset - MSIX_TABLE, size, value)
            out.append((OP_WRITE, size, data, value))
        else:
            out.append((OP_READ, size, data, 0))
        return out

    def _virtio_activate(self) -> list[Access]:
        """Reset a device and drive it to DRIVER_OK with random or laid-out queues, then kick."""
        live = [d for d in self.devices if d.virtio and d.base and self.mapped(d.base, d.size)]
        if not live:
            return self._bar()
        d = self.rnd.choice(live)
        b = d.base
        w: list[Access] = [(OP_WRITE, 1, b + 0x14, 0), (OP_WRITE, 1, b + 0x14, STATUS_ACK | STATUS_DRIVER)]
        offered = self.features.get(d.id, 1 << 32)
        r = self.rnd.random()
        if r < 0.7:  # what a driver does: a subset of the offer, with VERSION_1
            features = (offered & self.rnd.getrandbits(64)) | (offered & 1 << 32)
        elif r < 0.85:
            features = offered
        else:
            features = self.rnd.getrandbits(64)
        w += [(OP_WRITE, 4, b + 0x08, 1), (OP_WRITE, 4, b + 0x0C, features >> 32), (OP_WRITE, 4, b + 0x08, 0),
              (OP_WRITE, 4, b + 0x0C, features & 0xFFFF_FFFF),
              (OP_WRITE, 1, b + 0x14, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK),
              (OP_READ, 1, b + 0x14, 0)]
        for q in range(self.rnd.randrange(1, 5)):
            qsize = self.rnd.choice((1, 2, 4, 8, 16, 64, 256, 3, 0, 0xFFFF))
            w += [(OP_WRITE, 2, b + 0x16, q), (OP_WRITE, 2, b + 0x18, qsize),
                  (OP_WRITE, 2, b + 0x1A, self.rnd.choice((0, 1, 2, 0xFFFF, self.rnd.randrange(16))))]
            if self.rnd.random() < 0.6:
                desc, avail, used = self.lay_out_ring(max(1, min(qsize, 256)))
            else:
                desc, avail, used = (self.arena_address(16), self.arena_address(2), self.arena_address(4))
            for off, addr in ((0x20, desc), (0x28, avail), (0x30, used)):
                w += [(OP_WRITE, 4, b + off, addr & 0xFFFF_FFFF), (OP_WRITE, 4, b + off + 4, addr >> 32)]
            w.append((OP_WRITE, 2, b + 0x1C, 1 if self.rnd.random() < 0.9 else self.rnd.randrange(4)))
        w.append((OP_WRITE, 1, b + 0x14, self.rnd.choice((0xF, 0xF, 0xF, 0x7, 0x4F, 0x8F))))
        for _ in range(self.rnd.randrange(1, 6)):
            w.append((OP_WRITE, 2, b + NOTIFY + 4 * self.rnd.randrange(4), self.rnd.randrange(4)))
        w.append((OP_READ, 1, b + 0x14, 0))
        return w

    def lay_out_ring(self, qsize: int) -> tuple[int, int, int]:
        """Write a split ring into the arena (descriptors pointing into the arena, some chained,
        some indirect, odd lengths and flags) and return its three addresses. Written by this
        process before the chunk runs: guest RAM that the guest itself never touches."""
        assert self.mem is not None
        base = self.arena_address(4096)
        desc, avail, used = base, base + 16 * qsize, (base + 16 * qsize + 6 + 2 * qsize + 4095) & ~4095
        buf = bytearray()
        i = 0
        while i < qsize:  # chains of 1-3 as a driver builds them (readable, then writable), some broken
            chain = min(self.rnd.randint(1, 3), qsize - i)
            for j in range(chain):
                addr = self.arena_address(8) if self.rnd.random() < 0.95 else self.rnd.getrandbits(64)
                length = self.rnd.choice((16, 512, 4096, 1, 8, 65536, 0, self.rnd.getrandbits(32),
                                          self.rnd.randrange(600)))
                flags = (1 if j < chain - 1 else 0) | (2 if j > 0 or self.rnd.random() < 0.3 else 0)
                if self.rnd.random() < 0.1:
                    flags = self.rnd.choice((4, 6, self.rnd.getrandbits(16)))
                nxt = i + j + 1 if self.rnd.random() < 0.95 else self.rnd.getrandbits(16)
                buf += struct.pack("<QIHH", addr, length, flags, nxt % (1 << 16))
            i += chain
        self.mem[desc:desc + len(buf)] = bytes(buf)
        ring = [self.rnd.randrange(qsize) if self.rnd.random() < 0.9 else self.rnd.getrandbits(16)
                for _ in range(qsize)]
        idx = self.rnd.choice((1, qsize, self.rnd.getrandbits(16)))
        self.mem[avail:avail + 4 + 2 * qsize] = struct.pack(f"<HH{qsize}H", 0, idx, *ring)
        self.mem[used:used + 4] = bytes(4)
        # buffers: small integers (plausible request headers) and random bytes
        for _ in range(4):
            at = self.arena_address(8)
            self.mem[at:at + 64] = bytes(self.rnd.choice((0, 1, 2, 4, 8, 0xFF, self.rnd.randrange(256)))
                                         for _ in range(64))
        return desc, avail, used

    def _bar_move(self) -> list[Access]:
        """Move a BAR: into its window (the device follows), somewhere random, or back home."""
        if not self.devices:
            return self._ecam()
        d = self.rnd.choice(self.devices)
        r = self.rnd.random()
        home = self.original.get(d.id, d.base)
        if r < 0.5:
            target = home
        elif r < 0.8:
            target = home + self.rnd.randrange(1, 64) * d.size  # further into the same window
        else:
            target = self.rnd.getrandbits(64 if d.bar64 else 32) & ~0xF
        out: list[Access] = []
        if self.rnd.random() < 0.3:
            out.append((OP_WRITE, 2, self.ecam(d.segment, d.slot, 0x04), 0))  # decoding off while moving
        if self.rnd.random() < 0.2:  # size it first, as a driver does
            out += [(OP_WRITE, 4, self.ecam(d.segment, d.slot, 0x10), 0xFFFF_FFFF),
                    (OP_READ, 4, self.ecam(d.segment, d.slot, 0x10), 0)]
        out.append((OP_WRITE, 4, self.ecam(d.segment, d.slot, 0x10), target & 0xFFFF_FFF0))
        if d.bar64:
            out.append((OP_WRITE, 4, self.ecam(d.segment, d.slot, 0x14), target >> 32))
        out.append((OP_WRITE, 2, self.ecam(d.segment, d.slot, 0x04), 0x6))  # memory space, bus master
        return out

    def restore_bars(self, everyone: bool = False) -> list[Access]:
        """Put every moved BAR back where the VMM placed it (the campaign does this now and then,
        so that the devices stay reachable). With ``everyone``, every BAR is first parked at a
        free place and then brought home: a BAR left unmapped because it was moved onto another
        device's is mapped again only when its value changes."""
        out: list[Access] = []
        moved = [d for d in self.devices if everyone or d.base != self.original.get(d.id, d.base)]
        for phase in ("park", "home"):
            for n, d in enumerate(moved):
                home = self.original.get(d.id, d.base)
                target = home + (0x1000_0000 + n * d.size if phase == "park" else 0)
                out.append((OP_WRITE, 4, self.ecam(d.segment, d.slot, 0x10), target & 0xFFFF_FFF0))
                if d.bar64:
                    out.append((OP_WRITE, 4, self.ecam(d.segment, d.slot, 0x14), target >> 32))
                out.append((OP_WRITE, 2, self.ecam(d.segment, d.slot, 0x04), 0x6))
        return out

    def _platform_mmio(self) -> list[Access]:
        r = self.rnd.random()
        if r < 0.4:
            return [self._rw(GED + self.rnd.randrange(4), self.size((1, 2, 4)))]
        off = self.rnd.choice((0x0, 0x4, 0x8, 0xC, self.rnd.randrange(16)))
        access = self._rw(PCI_HOTPLUG + off, self.size((4, 4, 1, 2, 8)))
        if access[0] == OP_WRITE and off == 0x8:
            # an eject removes devices for good: one slot at a time, and often none
            value = 1 << self.rnd.randrange(32) if self.rnd.random() < 0.3 else 0
            access = (OP_WRITE, 4 if self.rnd.random() < 0.9 else access[1], access[2], value)
        return [access]

    def _random_mmio(self) -> list[Access]:
        size = self.size()
        if self.regions and self.rnd.random() < 0.4:
            address = self.rnd.choice(self.regions) + self.rnd.randrange(0, (1 << 30) - 8)
        elif self.rnd.random() < 0.5:
            address = ECAM + self.rnd.randrange(2 << 20)
        else:
            address = self.rnd.randrange(*MMIO32)
            while any(lo <= address < hi for lo, hi in KVM_MMIO) or address + size > MMIO32[1]:
                address = self.rnd.randrange(*MMIO32)
        return [self._rw(address, size)]

    mem: mmap.mmap | None = None


def _fixed_delivery(offset: int, size: int, value: int) -> int:
    """``value`` for a ``size``-byte write at ``offset`` of an MSI-X table with the delivery-mode
    bits (message data bits 8-10, the second byte of each entry's data dword at entry offset 8)
    cleared when they are written, so that only fixed, lowest-priority and NMI messages happen."""
    for i in range(size):
        if (offset + i) % 16 == 9:
            byte = value >> 8 * i & 0xFF
            mode = byte & 7
            if mode not in (0, 1, 4):
                value &= ~(7 << 8 * i)
    return value
