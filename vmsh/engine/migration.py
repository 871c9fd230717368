"""Live migration of a running VM to another VMM process over a unix socket.

cloud-hypervisor v40's semantics (its ``docs/live_migration.md`` and the ``vm-migration``
crate; the frames are :mod:`vmsh.engine.migration_protocol`):

* the source (:func:`send`) says Start, then with ``local`` hands over each guest RAM region's
  file (MemoryFd, SCM_RIGHTS: RAM must be shared memory), then the Config (the VM config and
  the guest RAM layout), which the destination checks it can build before answering; in both
  modes each tap's queue fds go along as MemoryFd frames of their own slots (:func:`tap_slot`):
  the migration socket is a unix socket, so the destination is on this host, where it could not
  open a single-queue tap by name while the source holds it;
* without ``local`` the memory is copied while the guest runs: what may hold data first, then
  rounds of the pages KVM's dirty log saw written (up to :data:`MAX_DIRTY_ROUNDS`, until a round
  finds nothing), then the VM is paused and the last round sends every page that differs from
  what the destination has (this also catches the VMM's own writes to guest RAM, which no dirty
  log sees); with ``local`` the VM is just paused, the destination maps the same files;
* with the VM paused, a serial console on a socket (``--serial socket=``) sends its listening
  socket and connected client the same way (:data:`SERIAL_SLOT`), so the client stays connected
  and the destination listens at the same path;
* then the State (the snapshot's state tree: vCPUs, irqchip, clock, devices) and Complete; the
  destination (:func:`receive`) builds the VM as a restore does and resumes it before it answers
  Complete, after which the source VMM exits.

Any failure on the source (a refusal, a broken stream) sends Abandon when it still can and
raises :class:`~vmsh.errors.MigrationError`; the caller resumes the VM if it paused it. The
destination drops whatever it built and raises.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmsh.config import canonical_json, normalize, vm_config_from_json
from vmsh.config import model as m
from vmsh.engine import migration_protocol as proto
from vmsh.engine import page_runs
from vmsh.engine.console import ConsoleBackend, SocketBackend
from vmsh.engine.dirty_log import DirtyLog
from vmsh.engine.memory import PAGE_SIZE, GuestMemoryMmap, GuestRegion
from vmsh.engine.memory_manager import memory_options
from vmsh.engine.migration_protocol import Command, Status
from vmsh.engine.snapshot import SavedVm, check_memory_table, memory_table, saved_vm_from
from vmsh.engine.state import VmState
from vmsh.errors import ConfigError, KvmError, MigrationError, VmshError

LOG = logging.getLogger(__name__)

#: copy rounds while the guest runs after the first full copy (cloud-hypervisor's
#: ``MAX_DIRTY_MIGRATIONS``)
MAX_DIRTY_ROUNDS = 5
#: the chunk the last round compares at once before it looks at single pages
_COMPARE_CHUNK = 1 << 20
LOCAL_NEEDS_SHARED = "Local migration requires shared memory or hugepages enabled"


@dataclass
class SendStats:
    """What a migration did, for logs and ``ci/bench/migration.py``."""

    total_s: float = 0.0
    #: from pausing the guest to the destination's Ok to Complete (it runs there by then)
    downtime_s: float = 0.0
    bytes_sent: int = 0
    rounds: int = 0
    dirty_log: bool = False
    #: bytes sent by each Memory request: the first copy, the dirty rounds, the last round
    round_bytes: list[int] = field(default_factory=list)
    #: where the time went: ``(step, seconds)``
    steps: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, step: str, since: float) -> float:
        now = time.monotonic()
        self.steps.append((step, round(now - since, 4)))
        return now


# --- source ------------------------------------------------------------------------------------------


def send(vm: Any, url: str, local: bool, pause: Callable[[], None]) -> SendStats:
    """Migrate ``vm`` (a running or paused :class:`~vmsh.engine.vm.Vm`) to the VMM listening at
    ``url``; ``pause()`` pauses it (the control layer's, with its events).

    :raises MigrationError: when the migration did not complete; the VM may be left paused.
    """
    started = time.monotonic()
    stats = SendStats()
    path = proto.socket_url_path(url)
    memory: GuestMemoryMmap = vm.memory
    serial = _serial_socket(vm)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(path)
        except OSError as err:
            raise MigrationError(f"Cannot connect to the migration destination {path}") from err
        try:
            proto.request(sock, Command.START)
            # refusals of this VM come after Start, so the Abandon frees the destination too
            fds = _shared_fds(memory) if local else []
            try:
                vm.check_saveable()
            except VmshError as err:
                raise MigrationError("Cannot migrate this VM") from err
            for slot, fd in enumerate(fds):
                proto.send_fd(sock, slot, fd)
                proto.expect_ok(sock, f"memory fd of slot {slot}")
            for slot, fd in _tap_fds(vm):
                proto.send_fd(sock, slot, fd)
                proto.expect_ok(sock, f"tap fd of slot {slot:#x}")
            proto.request(sock, Command.CONFIG, _config_payload(vm))
            paused_at = time.monotonic()
            if local:
                pause()
                paused_at = time.monotonic()
            else:
                paused_at = _copy_memory(vm, sock, pause, stats)
            if serial is not None:
                # paused: the serial socket's listener and client move (the client stays
                # connected); what the client typed and the guest did not take yet goes along
                for slot, fd in enumerate(serial.hold(), SERIAL_SLOT):
                    proto.send_fd(sock, slot, fd)
                    proto.expect_ok(sock, f"serial socket fd of slot {slot:#x}")
            _config_json, tree = vm.saved_state()
            proto.request(sock, Command.STATE, json.dumps(tree, separators=(",", ":")).encode())
            proto.request(sock, Command.COMPLETE)
        except BaseException as err:
            if serial is not None:
                serial.release()
            if not isinstance(err, VmshError):
                raise
            _abandon(sock)
            if isinstance(err, MigrationError):
                raise
            raise MigrationError("The migration failed") from err
    finally:
        sock.close()
    if serial is not None:
        serial.owns_path = False  # the destination listens there now
    now = time.monotonic()
    stats.total_s, stats.downtime_s = now - started, now - paused_at
    LOG.info("migrated to %s in %.2f s (guest paused %.3f s, %d bytes of RAM copied in %d requests %s%s; %s)",
             path, stats.total_s, stats.downtime_s, stats.bytes_sent, stats.rounds, stats.round_bytes,
             ", dirty log" if stats.dirty_log else "", stats.steps)
    return stats


def _abandon(sock: socket.socket) -> None:
    """Tell the destination to drop what it built (it may be gone already)."""
    try:
        sock.settimeout(5)
        proto.send_request(sock, Command.ABANDON)
        proto.read_response(sock)
    except (MigrationError, OSError):
        pass


def _shared_fds(memory: GuestMemoryMmap) -> list[int]:
    """Each region's memfd, in region order; :raises MigrationError: unless all are shared."""
    fds = []
    for region in memory.regions:
        if region.shared and region.fd is not None:
            fds.append(region.fd)
        elif region.shared and region.backing is not None and region.backing[1] == 0:
            fds.append(region.backing[0])
        else:
            raise MigrationError(LOCAL_NEEDS_SHARED)
    return fds


def _serial_socket(vm: Any) -> SocketBackend | None:
    """The serial console's socket backend, if ``--serial socket=`` (the only console mode on a
    socket: cloud-hypervisor's virtio console has none)."""
    platform = getattr(vm, "platform", None)
    for backend in getattr(platform, "backends", ()):
        if isinstance(backend, SocketBackend):
            return backend
    return None


def _tap_fds(vm: Any) -> list[tuple[int, int]]:
    """Each tap's queue fds as ``(slot, fd)`` (:func:`tap_slot`): the destination on this host
    uses them instead of opening the tap by name, which a single-queue tap refuses (EBUSY)
    while this process holds it. The migration socket is a unix socket: always this host."""
    from vmsh.devices.virtio.net import VirtioNet  # a device class: only the net devices' taps

    out: list[tuple[int, int]] = []
    nets: list[m.NetConfig] = vm.config.net or []
    manager = vm.devices if nets else None
    for index, net in enumerate(nets):
        entry = manager.devices.get(net.id) if manager is not None and net.id is not None else None
        device = getattr(getattr(entry, "transport", None), "device", None)
        if isinstance(device, VirtioNet):
            out.extend((tap_slot(index, queue), fd) for queue, fd in enumerate(device.tap.fds))
    return out


#: MemoryFd slots from here carry taps' fds (vmsh's use of the frame; cloud-hypervisor's slots
#: are memory regions, far fewer)
TAP_SLOT_BASE = 0x10000


#: MemoryFd slots of the serial console's socket (``--serial socket=``): its listener, then
#: its connected client if there is one
SERIAL_SLOT = 0x20000


def tap_slot(net_index: int, queue: int) -> int:
    """The MemoryFd slot of queue pair ``queue`` of the config's ``net_index``-th net device."""
    return TAP_SLOT_BASE + (net_index << 8) + queue


def _config_payload(vm: Any) -> bytes:
    """The Config request: the VM config and its guest RAM (cloud-hypervisor's
    ``VmMigrationConfig``: ``vm_config`` and ``memory_manager_data``)."""
    memory: GuestMemoryMmap = vm.memory
    return json.dumps({
        "vm_config": json.loads(canonical_json(vm.config)),
        "memory_manager_data": {
            "ranges": [list(r) for r in memory_table(memory)],
            "boot_ram": memory.boot_size,
            "regions": [[r.start, r.size, r.hotplug] for r in memory.regions],
        },
    }, separators=(",", ":")).encode()


def _copy_memory(vm: Any, sock: socket.socket, pause: Callable[[], None], stats: SendStats) -> float:
    """Copy guest RAM while the guest runs, pause it, send the last pages; returns when it paused."""
    memory: GuestMemoryMmap = vm.memory
    # what the destination holds, page for page: it starts as zeros like the destination's RAM
    # (anonymous mappings: zero pages until written, where a bytearray would zero all of it now)
    shadow = {r.start: mmap.mmap(-1, r.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) for r in memory.regions}
    # per region, the runs sent so far: with the runs that may hold data, where the last round looks
    sent: dict[int, page_runs.Runs] = {r.start: [] for r in memory.regions}
    log = DirtyLog(vm.vm_fd, memory) if vm.state is VmState.RUNNING else None
    t = time.monotonic()
    if log is not None:
        try:
            log.start()
            stats.dirty_log = True
        except KvmError as err:
            LOG.info("no dirty page log (%s): guest RAM is copied once, then compared after the pause", err)
            log = None
    try:
        t = stats.mark("dirty log on", t)
        first = [(r.start + off, n) for r in memory.regions for off, n in r.data_runs()]
        t = stats.mark("data runs", t)
        _send_ranges(sock, memory, shadow, sent, first, stats)
        t = stats.mark("first copy", t)
        if log is not None:
            for _ in range(MAX_DIRTY_ROUNDS):
                dirty = log.dirty_ranges()
                if not dirty:
                    break
                _send_ranges(sock, memory, shadow, sent, dirty, stats)
                t = stats.mark("dirty round", t)
        if vm.state is VmState.RUNNING:
            pause()
        paused_at = t = stats.mark("pause", t)
        changed = _changed_ranges(memory, shadow, sent)
        t = stats.mark("compare", t)
        _send_ranges(sock, memory, shadow, sent, changed, stats)
        t = stats.mark("last round", t)
    finally:
        if log is not None:
            log.stop()
        for copy in shadow.values():
            try:
                copy.close()
            except BufferError:
                pass  # a view is still referenced (by a traceback): unmapped with its last view
    return paused_at


def _send_ranges(sock: socket.socket, memory: GuestMemoryMmap, shadow: dict[int, mmap.mmap],
                 sent: dict[int, page_runs.Runs], ranges: list[tuple[int, int]], stats: SendStats) -> None:
    """One Memory request. Each range is copied into ``shadow`` first and sent from there, so
    ``shadow`` is exactly what the destination has even when the guest writes meanwhile."""
    if not ranges:
        stats.round_bytes.append(0)
        return
    views = []
    for gpa, length in ranges:
        region = memory.find_region(gpa)
        offset = gpa - region.start
        if offset + length > region.size:
            raise MigrationError(f"memory range {gpa:#x}+{length:#x} crosses a region end")
        copy = memoryview(shadow[region.start])[offset:offset + length]
        copy[:] = region.view[offset:offset + length]
        views.append(copy)
        sent[region.start].append((offset, length))
    proto.send_memory(sock, ranges, views)
    stats.round_bytes.append(sum(n for _, n in ranges))
    stats.bytes_sent += stats.round_bytes[-1]
    stats.rounds += 1


def _changed_ranges(memory: GuestMemoryMmap, shadow: dict[int, mmap.mmap],
                    sent: dict[int, page_runs.Runs]) -> list[tuple[int, int]]:
    """The pages of guest RAM that differ from ``shadow``, merged into ranges. Only pages that
    may hold data now or were sent can differ: the rest are zeros on both sides."""
    ranges: list[tuple[int, int]] = []
    for region in memory.regions:
        was = memoryview(shadow[region.start])
        runs = page_runs.merge(region.data_runs(), sent[region.start])
        for chunk, end in _chunks(runs):
            if region.view[chunk:end] == was[chunk:end]:
                continue
            for page in range(chunk, end, PAGE_SIZE):
                if region.view[page:page + PAGE_SIZE] != was[page:page + PAGE_SIZE]:
                    gpa = region.start + page
                    if ranges and ranges[-1][0] + ranges[-1][1] == gpa:
                        ranges[-1] = (ranges[-1][0], ranges[-1][1] + PAGE_SIZE)
                    else:
                        ranges.append((gpa, PAGE_SIZE))
    return ranges


def _chunks(runs: page_runs.Runs) -> list[tuple[int, int]]:
    """``runs`` cut into pieces of at most :data:`_COMPARE_CHUNK` bytes, as ``(start, end)``."""
    return [(start, min(start + _COMPARE_CHUNK, offset + length))
            for offset, length in runs for start in range(offset, offset + length, _COMPARE_CHUNK)]


# --- destination ---------------------------------------------------------------------------------------

#: checks a migrating VM's config can be built here (``vmsh.engine.builder.check_restorable``)
ConfigCheck = Callable[[m.VmConfig], None]
#: builds the VM a migration's state describes on the guest RAM it received, Paused
#: (``vmsh.engine.builder.build_restored``), with the serial console's backend if it came along
Build = Callable[[SavedVm, Callable[[], GuestMemoryMmap], ConsoleBackend | None], Any]


@dataclass
class _Incoming:
    """What the destination received so far."""

    config_text: str | None = None
    config: m.VmConfig | None = None
    memory: GuestMemoryMmap | None = None
    ranges: list[tuple[int, int]] | None = None
    boot_ram: int = 0
    #: the source's tap fds by net device index (:func:`tap_slot`); the VM built gets copies
    taps: dict[int, list[int]] = field(default_factory=dict)
    #: the serial console on the source's socket, which the VM built owns
    serial: SocketBackend | None = None
    vm: Any = None

    def drop(self, fds: dict[int, int]) -> None:
        for tap in self.taps.values():
            for fd in tap:
                _close(fd)
        self.taps = {}
        if self.vm is not None:
            self.vm.shutdown()  # it owns the memory and the serial console
        else:
            if self.memory is not None:
                self.memory.close()
            if self.serial is not None:
                self.serial.close()  # not its path: the source still listens there
        self.vm = self.memory = self.serial = None
        for fd in fds.values():
            _close(fd)
        fds.clear()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def receive(url: str, check: ConfigCheck, build: Build, adopt: Callable[[Any], None],
            accept_timeout: float | None = None) -> None:
    """Listen at ``url``, take one migration, and hand the resumed VM to ``adopt`` (which
    resumes it) before answering the source's Complete.

    :raises MigrationError: when the migration did not complete; nothing is left built.
    """
    path = proto.socket_url_path(url)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            listener.bind(path)
            listener.listen(1)
        except OSError as err:
            raise MigrationError(f"Cannot listen for a migration on {path}") from err
        listener.settimeout(accept_timeout)
        try:
            conn, _ = listener.accept()
        except OSError as err:
            raise MigrationError(f"No migration came to {path}") from err
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
    finally:
        listener.close()
    conn.settimeout(None)
    with conn:
        _receive_on(conn, check, build, adopt)


def _receive_on(conn: socket.socket, check: ConfigCheck, build: Build, adopt: Callable[[Any], None]) -> None:
    incoming = _Incoming()
    fds: dict[int, int] = {}
    started = False
    try:
        while True:
            command, length = proto.read_request(conn)
            if command is Command.MEMORY_FD:
                slot, fd = proto.recv_fd(conn, length)
                if slot in fds:
                    os.close(fd)
                    raise MigrationError(f"A second memory fd for slot {slot}")
                fds[slot] = fd
                proto.send_response(conn, Status.OK if started else Status.ERROR)
                continue
            if command is Command.MEMORY:
                if not started or incoming.memory is None:
                    raise MigrationError("Memory came before the migration's config")
                _receive_memory(conn, incoming.memory, length)
                proto.send_response(conn, Status.OK)
                continue
            payload = proto.read_payload(conn, length)
            if command is Command.START:
                started = True
                proto.send_response(conn, Status.OK)
            elif not started:
                proto.send_response(conn, Status.ERROR)
            elif command is Command.CONFIG:
                try:
                    _take_config(incoming, payload, fds, check)
                except VmshError as err:
                    LOG.error("migration config refused: %s", err)
                    proto.send_response(conn, Status.ERROR)
                    raise MigrationError("The migration's config was refused") from err
                proto.send_response(conn, Status.OK)
            elif command is Command.STATE:
                try:
                    _take_state(incoming, payload, fds, build)
                except VmshError as err:
                    LOG.error("migration state refused: %s", err)
                    proto.send_response(conn, Status.ERROR)
                    raise MigrationError("The migration's state was refused") from err
                proto.send_response(conn, Status.OK)
            elif command is Command.COMPLETE:
                if incoming.vm is None:
                    proto.send_response(conn, Status.ERROR)
                    raise MigrationError("Complete came before the migration's state")
                vm, incoming.vm = incoming.vm, None
                try:
                    adopt(vm)
                except BaseException:
                    proto.send_response(conn, Status.ERROR)
                    raise
                if incoming.serial is not None:
                    incoming.serial.owns_path = True  # the source no longer removes it
                    incoming.serial = None  # the VM's now
                proto.send_response(conn, Status.OK)
                return
            elif command is Command.ABANDON:
                proto.send_response(conn, Status.OK)
                raise MigrationError("The source abandoned the migration")
            else:
                proto.send_response(conn, Status.ERROR)
    finally:
        incoming.drop(fds)


def _take_config(incoming: _Incoming, payload: bytes, fds: dict[int, int], check: ConfigCheck) -> None:
    """Check the Config can be built here and make its guest RAM (from the received fds, or fresh)."""
    if incoming.config is not None:
        raise MigrationError("A second config")
    try:
        data = json.loads(payload)
        config_text = json.dumps(data["vm_config"])
        mm_data = data["memory_manager_data"]
        regions = [(int(s), int(n), bool(h)) for s, n, h in mm_data["regions"]]
        boot_ram = int(mm_data["boot_ram"])
        ranges_in = mm_data["ranges"]
    except (ValueError, KeyError, TypeError) as err:
        raise MigrationError("The migration's config is not well formed") from err
    try:
        config = normalize(vm_config_from_json(config_text))
    except ConfigError as err:
        raise MigrationError("The migration's VM config is not valid") from err
    check(config)
    _check_host_files(config)
    taps = _tap_fds_by_net(config, fds)
    ranges = check_memory_table(ranges_in, config.memory, boot_ram)
    if sum(n for _, n, _ in regions) != sum(n for _, n in ranges) or any(
            s % PAGE_SIZE or n <= 0 or n % PAGE_SIZE for s, n, _ in regions):
        raise MigrationError("The migration's RAM regions do not match its RAM ranges")
    memory_slots = sorted(slot for slot in fds if slot < TAP_SLOT_BASE)
    if memory_slots and memory_slots != list(range(len(regions))):
        raise MigrationError(f"Memory fds came for slots {memory_slots}, the RAM has {len(regions)} regions")
    made: list[GuestRegion] = []
    try:
        for slot, (start, size, hotplug) in enumerate(regions):
            if memory_slots:
                fd = fds.pop(slot)
                try:
                    if os.fstat(fd).st_size < size:
                        raise MigrationError(f"The memory fd of slot {slot} is smaller than its region")
                    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                except (OSError, ValueError) as err:
                    os.close(fd)
                    raise MigrationError(f"Cannot map the memory fd of slot {slot}") from err
                region = GuestRegion(start, mm, fd, shared=True)
            else:
                region = GuestRegion.create(start, size, memory_options(config.memory))
            region.hotplug = hotplug
            made.append(region)
        memory = GuestMemoryMmap(made)
    except BaseException:
        for region in made:
            region.close()
        raise
    incoming.config_text, incoming.config, incoming.memory = config_text, config, memory
    incoming.ranges, incoming.boot_ram = ranges, boot_ram
    incoming.taps = taps


def _tap_fds_by_net(config: m.VmConfig, fds: dict[int, int]) -> dict[int, list[int]]:
    """The received taps' fds (:func:`tap_slot`) by net device index, taken out of ``fds``.

    :raises MigrationError: for fds that match no tap net device of ``config``.
    """
    by_net: dict[int, list[int]] = {}
    for slot in sorted(slot for slot in fds if TAP_SLOT_BASE <= slot < SERIAL_SLOT):
        by_net.setdefault((slot - TAP_SLOT_BASE) >> 8, []).append(slot)
    nets = config.net or []
    for index, slots in by_net.items():
        if index >= len(nets) or nets[index].vhost_user or \
                slots != [tap_slot(index, q) for q in range(len(slots))] or len(slots) * 2 != nets[index].num_queues:
            raise MigrationError(f"Tap fds came for slots {[hex(s) for s in slots]}, which no net device has")
    return {index: [fds.pop(slot) for slot in slots] for index, slots in by_net.items()}


def _check_host_files(config: m.VmConfig) -> None:
    """The disk images the VM uses must be reachable from here, as the source opened them."""
    for disk in config.disks or []:
        if disk.path is None:
            continue
        mode = os.R_OK if disk.readonly else os.R_OK | os.W_OK
        if not os.access(disk.path, mode):
            raise MigrationError(f"Disk {disk.path} cannot be opened here")


def _receive_memory(conn: socket.socket, memory: GuestMemoryMmap, length: int) -> None:
    table = proto.decode_table(proto.read_payload(conn, length))
    for gpa, size in table:
        if not memory.is_valid_range(gpa, size):
            raise MigrationError(f"Memory range {gpa:#x}+{size:#x} is not guest RAM")
        for view in memory.slices(gpa, size):
            proto.recv_into(conn, view)


def _take_state(incoming: _Incoming, payload: bytes, fds: dict[int, int], build: Build) -> None:
    if incoming.memory is None or incoming.config_text is None or incoming.vm is not None:
        raise MigrationError("State came before the migration's config")
    try:
        tree = json.loads(payload)
    except ValueError as err:
        raise MigrationError("The migration's state is not JSON") from err
    if not isinstance(tree, dict):
        raise MigrationError("The migration's state is not a state tree")
    saved = saved_vm_from(incoming.config_text, tree, Path(), "the migration's config")
    if saved.ranges != incoming.ranges or saved.boot_ram != incoming.boot_ram:
        raise MigrationError("The migration's state does not match its config's RAM")
    memory, incoming.memory = incoming.memory, None
    # The taps the source holds are used through its fds (as ``--net fd=`` would): a
    # single-queue tap cannot be opened by name while another process has it (the kernel's
    # tun_attach refuses it, EBUSY). The config keeps the tap's name, not the fds, so vm.info,
    # a snapshot and a further migration see the same net device as on the source.
    incoming.serial = _serial_backend(saved.config, fds)
    nets = saved.config.net or []
    copies: list[tuple[int, int]] = []  # (copy, the fd it copies)
    for index, tap in incoming.taps.items():
        dups = [os.dup(fd) for fd in tap]
        nets[index].fds = dups
        copies.extend(zip(dups, tap, strict=True))
    try:
        incoming.vm = build(saved, lambda: memory, incoming.serial)
    except BaseException:
        memory.close()  # a VM that failed to build closed it already if it took it: closing twice is safe
        for copy, fd in copies:  # the copies a net device did not take (and close) yet
            if _same_file(copy, fd):
                _close(copy)
        raise
    finally:
        for index in incoming.taps:
            nets[index].fds = None


def _serial_backend(config: m.VmConfig, fds: dict[int, int]) -> SocketBackend | None:
    """The serial console on the source's socket (:data:`SERIAL_SLOT`), taken out of ``fds``.

    :raises MigrationError: for fds that are not a listening unix socket (and a connected one)
        of a ``--serial socket=`` console.
    """
    slots = sorted(slot for slot in fds if slot >= SERIAL_SLOT)
    if not slots:
        return None
    taken = [fds.pop(slot) for slot in slots]
    socks: list[socket.socket] = []
    try:
        if config.serial.mode is not m.ConsoleOutputMode.SOCKET or config.serial.socket is None or \
                slots not in ([SERIAL_SLOT], [SERIAL_SLOT, SERIAL_SLOT + 1]):
            raise MigrationError(f"Serial socket fds came for slots {[hex(s) for s in slots]}, "
                                 "which the VM's serial console does not have")
        while taken:
            socks.append(socket.socket(fileno=taken[0]))
            taken.pop(0)
        listening = socks[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if any(s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM for s in socks) or not listening:
            raise MigrationError("The serial console's fds are not its unix sockets")
        return SocketBackend(config.serial.socket, "serial-manager",
                             inherited=(socks[0], socks[1] if len(socks) > 1 else None))
    except (OSError, MigrationError) as err:
        for fd in taken:
            _close(fd)
        for sock in socks:
            sock.close()
        if isinstance(err, MigrationError):
            raise
        raise MigrationError("The serial console's fds are not its unix sockets") from err


def _same_file(a: int, b: int) -> bool:
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
