"""Live migration without KVM: the frames, the range tables, fd passing, and both sides' handling
of refusals, aborts and broken streams (``vmsh.engine.migration``, ``migration_protocol``)."""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vmsh.config import canonical_json, normalize
from vmsh.config import model as m
from vmsh.engine import migration
from vmsh.engine import migration_protocol as proto
from vmsh.engine.console import SocketBackend
from vmsh.engine.memory import GuestMemoryMmap, MemoryOptions
from vmsh.engine.migration_protocol import Command, Status
from vmsh.engine.state import VmState
from vmsh.errors import KvmError, MigrationError
from vmsh.harness.waiting import wait_until

MIB = 1 << 20


def test_frames_are_cloud_hypervisors_16_bytes() -> None:
    a, b = socket.socketpair()
    with a, b:
        proto.send_request(a, Command.CONFIG, b"{}")
        raw = b.recv(18)
        assert raw == bytes([2, 0]) + bytes(6) + (2).to_bytes(8, "little") + b"{}"
        proto.send_response(b, Status.ERROR)
        assert proto.read_response(a) is Status.ERROR
        a.sendall(bytes([9, 0]) + bytes(14))
        with pytest.raises(MigrationError, match="Unknown migration command 9"):
            proto.read_request(b)


def test_range_tables_and_dirty_bitmaps() -> None:
    table = [(0x1000, 0x2000), (0x100000000, 0x1000)]
    assert proto.decode_table(proto.encode_table(table)) == table
    with pytest.raises(MigrationError):
        proto.decode_table(b"\0" * 17)
    rng = random.Random(7)
    for _ in range(50):
        bits = [rng.random() < 0.3 for _ in range(rng.randrange(1, 300))]
        bitmap = bytes(sum(1 << j for j in range(8) if i + j < len(bits) and bits[i + j])
                       for i in range(0, len(bits), 8))
        pages = [p for p, on in enumerate(bits) if on]
        got = proto.ranges_from_bitmap(bitmap, 0x10000)
        assert [p for gpa, n in got for p in range((gpa - 0x10000) // 4096, (gpa - 0x10000 + n) // 4096)] == pages
        assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(got))  # runs are merged


def test_memory_fd_travels_with_its_slot() -> None:
    a, b = socket.socketpair()
    fd = os.memfd_create("t")
    os.write(fd, b"guest ram")
    with a, b:
        proto.send_fd(a, 3, fd)
        command, length = proto.read_request(b)
        slot, received = proto.recv_fd(b, length)
    os.close(fd)
    assert (command, slot) == (Command.MEMORY_FD, 3)
    assert os.pread(received, 9, 0) == b"guest ram"
    os.close(received)


def test_only_unix_urls() -> None:
    assert proto.socket_url_path("unix:/run/m.sock") == "/run/m.sock"
    for url in ("tcp:1.2.3.4:5", "/run/m.sock", "unix:"):
        with pytest.raises(MigrationError, match="only unix:PATH"):
            proto.socket_url_path(url)


# --- the source ---------------------------------------------------------------------------------------


class FakeVmFd:
    """Memslots without dirty logging (the fallback: copy, pause, compare)."""

    def set_user_memory_region(self, slot: int, gpa: int, size: int, addr: int, flags: int = 0) -> None:
        if flags:
            raise KvmError("no dirty log here")


class FakeVm:
    def __init__(self, shared: bool = False) -> None:
        self.memory = GuestMemoryMmap.create(4 * MIB, MemoryOptions(shared=shared))
        self.config = m.VmConfig(payload=m.PayloadConfig(kernel="/k"), memory=m.MemoryConfig(size=4 * MIB))
        self.state = VmState.RUNNING
        self.vm_fd = FakeVmFd()
        self.memory.register(self.vm_fd)

    def check_saveable(self) -> None:
        pass

    def saved_state(self) -> tuple[str, dict[str, Any]]:
        return canonical_json(self.config), {"tree": True}


def destination(path: Path, answer: Callable[[Command, bytes], Status], memory: bytearray | None = None
                ) -> tuple[threading.Thread, list[Command]]:
    """A scripted destination at ``path``: ``answer`` decides each response; Memory requests are
    written into ``memory``; returns its thread and the commands it saw."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    seen: list[Command] = []

    def serve() -> None:
        conn, _ = listener.accept()
        listener.close()
        with conn:
            try:
                while True:
                    command, length = proto.read_request(conn)
                    seen.append(command)
                    if command is Command.MEMORY_FD:
                        os.close(proto.recv_fd(conn, length)[1])
                        payload = b""
                    elif command is Command.MEMORY:
                        assert memory is not None
                        for gpa, n in proto.decode_table(proto.read_payload(conn, length)):
                            memory[gpa:gpa + n] = proto.recv_exact(conn, n)
                        payload = b""
                    else:
                        payload = proto.read_payload(conn, length)
                    status = answer(command, payload)
                    if status is Status.INVALID:
                        return  # hang up
                    proto.send_response(conn, status)
                    if command in (Command.COMPLETE, Command.ABANDON):
                        return
            except MigrationError:
                return

    thread = threading.Thread(target=serve)
    thread.start()
    return thread, seen


def test_a_refused_config_abandons_and_never_pauses(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    thread, seen = destination(sock, lambda c, _p: Status.ERROR if c is Command.CONFIG else Status.OK)
    paused = []
    with pytest.raises(MigrationError, match="refused the migration's config"):
        migration.send(FakeVm(), f"unix:{sock}", False, lambda: paused.append(1))
    thread.join(10)
    assert seen == [Command.START, Command.CONFIG, Command.ABANDON] and not paused


def test_local_needs_shared_memory(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    thread, seen = destination(sock, lambda c, _p: Status.OK)
    with pytest.raises(MigrationError, match=migration.LOCAL_NEEDS_SHARED):
        migration.send(FakeVm(shared=False), f"unix:{sock}", True, lambda: None)
    thread.join(10)
    assert seen == [Command.START, Command.ABANDON]


def test_local_sends_each_regions_fd_then_pauses(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    thread, seen = destination(sock, lambda c, _p: Status.OK)
    vm = FakeVm(shared=True)
    paused = []
    migration.send(vm, f"unix:{sock}", True, lambda: paused.append(1))
    thread.join(10)
    assert seen == [Command.START, Command.MEMORY_FD, Command.CONFIG, Command.STATE, Command.COMPLETE]
    assert paused == [1]


def test_copy_sends_every_page_including_writes_made_before_the_pause(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    vm = FakeVm()
    vm.memory.write(0x1000, b"early")
    vm.memory.write(0x5000, b"dropped later")
    received = bytearray(4 * MIB)
    thread, seen = destination(sock, lambda c, _p: Status.OK, received)

    def pause() -> None:
        # written after the first copy and seen by no dirty log (there is none here): the last
        # round, which compares against what was sent, must catch it
        vm.memory.write(0x1000, b"late!")
        vm.memory.write(0x3FF000, b"end")
        vm.memory.discard(0x5000, 4096)  # no data any more (a balloon's page), but it was sent
        vm.state = VmState.PAUSED

    stats = migration.send(vm, f"unix:{sock}", False, pause)
    thread.join(10)
    assert received == vm.memory.read(0, 4 * MIB)
    assert not stats.dirty_log and stats.round_bytes[-1] == 3 * 4096
    assert seen[:2] == [Command.START, Command.CONFIG] and seen[-2:] == [Command.STATE, Command.COMPLETE]


def test_a_destination_that_hangs_up_is_an_error(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    thread, _seen = destination(sock, lambda c, _p: Status.INVALID if c is Command.STATE else Status.OK,
                                bytearray(4 * MIB))
    vm = FakeVm()
    with pytest.raises(MigrationError):
        migration.send(vm, f"unix:{sock}", False, lambda: setattr(vm, "state", VmState.PAUSED))
    thread.join(10)


def test_no_destination(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="Cannot connect"):
        migration.send(FakeVm(), f"unix:{tmp_path / 'none.sock'}", False, lambda: None)


# --- the destination ----------------------------------------------------------------------------------


def receiving(path: Path, check: Callable[[m.VmConfig], None] = lambda _c: None
              ) -> tuple[threading.Thread, list[BaseException], list[Any]]:
    errors: list[BaseException] = []
    built: list[Any] = []

    def run() -> None:
        try:
            migration.receive(f"unix:{path}", check, lambda saved, memory, _serial: built.append(saved),
                              built.append)
        except BaseException as err:  # the test looks at it
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    for _ in range(500):
        if path.exists():
            break
        threading.Event().wait(0.01)
    return thread, errors, built


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    s.settimeout(10)
    return s


def config_payload(size: int = 4 * MIB) -> bytes:
    config = normalize(m.VmConfig(payload=m.PayloadConfig(kernel="/k"), memory=m.MemoryConfig(size=size)))
    return json.dumps({"vm_config": json.loads(canonical_json(config)),
                       "memory_manager_data": {"ranges": [[0, size]], "boot_ram": size,
                                               "regions": [[0, size, False]]}}).encode()


def test_destination_refuses_commands_before_start_and_ends_on_abandon(tmp_path: Path) -> None:
    path = tmp_path / "r.sock"
    thread, errors, built = receiving(path)
    with connect(path) as s:
        proto.send_request(s, Command.CONFIG, config_payload())
        assert proto.read_response(s) is Status.ERROR
        assert not path.exists()  # one connection: the socket file is gone once it is taken
        proto.send_request(s, Command.START)
        assert proto.read_response(s) is Status.OK
        proto.send_request(s, Command.CONFIG, config_payload())
        assert proto.read_response(s) is Status.OK
        proto.send_memory(s, [(0x1000, 4096)], [memoryview(b"x" * 4096)])
        proto.send_request(s, Command.ABANDON)
        assert proto.read_response(s) is Status.OK
    thread.join(10)
    assert isinstance(errors[0], MigrationError) and "abandoned" in str(errors[0]) and not built


def test_destination_refuses_a_config_it_cannot_build(tmp_path: Path) -> None:
    path = tmp_path / "r.sock"

    def check(_config: m.VmConfig) -> None:
        raise MigrationError("not here")

    thread, errors, built = receiving(path, check)
    with connect(path) as s:
        proto.request(s, Command.START)
        proto.send_request(s, Command.CONFIG, config_payload())
        assert proto.read_response(s) is Status.ERROR
    thread.join(10)
    assert "config was refused" in str(errors[0]) and not built


def test_destination_refuses_memory_outside_guest_ram_and_a_broken_stream(tmp_path: Path) -> None:
    path = tmp_path / "r.sock"
    thread, errors, _built = receiving(path)
    with connect(path) as s:
        proto.request(s, Command.START)
        proto.request(s, Command.CONFIG, config_payload())
        proto.send_request(s, Command.MEMORY, proto.encode_table([(8 * MIB, 4096)]))
    thread.join(10)
    assert "is not guest RAM" in str(errors[0])

    path = tmp_path / "r2.sock"
    thread, errors, _built = receiving(path)
    with connect(path) as s:
        proto.request(s, Command.START)
        s.sendall(b"\x02\x00")  # half a header, then the source is gone
    thread.join(10)
    assert isinstance(errors[0], MigrationError)


class FakePlatform:
    def __init__(self, backends: list[Any]) -> None:
        self.backends = backends


def serial_socket_vm(tmp_path: Path) -> tuple[FakeVm, SocketBackend, socket.socket, list[bytes]]:
    """A VM whose serial console is on a socket, with a client connected and input flowing."""
    vm = FakeVm(shared=True)
    path = tmp_path / "con.sock"
    vm.config.serial = m.ConsoleConfig(mode=m.ConsoleOutputMode.SOCKET, socket=str(path))
    backend = SocketBackend(str(path))
    vm.platform = FakePlatform([backend])  # type: ignore[attr-defined]  # the real Vm's attribute
    typed: list[bytes] = []
    backend.start_input(lambda data: typed.append(data) or len(data))
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))
    wait_until(lambda: backend._client is not None, 5, "the console to accept", interval=0.01)
    return vm, backend, client, typed


def test_a_serial_socket_moves_after_the_pause_and_stays_on_a_refusal(tmp_path: Path) -> None:
    vm, backend, client, typed = serial_socket_vm(tmp_path)
    sock = tmp_path / "m.sock"
    thread, seen = destination(sock, lambda c, _p: Status.ERROR if c is Command.STATE else Status.OK)
    try:
        paused: list[int] = []

        def pause() -> None:
            paused.append(len(seen))

        with pytest.raises(MigrationError, match="refused the migration's state"):
            migration.send(vm, f"unix:{sock}", True, pause)
        thread.join(10)
        # memory fd, config, then (paused) the listener and the client, then the state
        assert seen == [Command.START, Command.MEMORY_FD, Command.CONFIG, Command.MEMORY_FD, Command.MEMORY_FD,
                        Command.STATE, Command.ABANDON]
        assert paused == [3]
        # the source took the console back: it reads its client and still owns the path
        client.sendall(b"still here")
        wait_until(lambda: b"".join(typed) == b"still here", 5, "the input after the refusal", interval=0.01)
        assert backend.owns_path
    finally:
        client.close()
        backend.close()
    assert not Path(backend.path).exists()


def test_a_moved_serial_socket_is_left_to_the_destination(tmp_path: Path) -> None:
    vm, backend, client, _typed = serial_socket_vm(tmp_path)
    sock = tmp_path / "m.sock"
    thread, seen = destination(sock, lambda c, _p: Status.OK)
    try:
        migration.send(vm, f"unix:{sock}", True, lambda: None)
        thread.join(10)
        assert seen.count(Command.MEMORY_FD) == 3 and seen[-1] is Command.COMPLETE
        assert not backend.owns_path
    finally:
        client.close()
        backend.close()
    assert Path(backend.path).exists()  # the destination's now


def test_destination_takes_only_a_serial_sockets_listener_and_client(tmp_path: Path) -> None:
    config = normalize(m.VmConfig(payload=m.PayloadConfig(kernel="/k"), memory=m.MemoryConfig(size=4 * MIB),
                                  serial=m.ConsoleConfig(mode=m.ConsoleOutputMode.SOCKET,
                                                         socket=str(tmp_path / "con.sock"))))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "src.sock"))
    listener.listen(1)
    unbound = socket.socket(socket.AF_UNIX)
    a, b = socket.socketpair()
    with listener, unbound, a, b:
        cases: list[tuple[m.VmConfig, dict[int, int], str]] = [
            (normalize(m.VmConfig(payload=m.PayloadConfig(kernel="/k"), memory=m.MemoryConfig(size=4 * MIB))),
             {migration.SERIAL_SLOT: listener.fileno()}, "serial console does not have"),
            (config, {migration.SERIAL_SLOT + 1: a.fileno()}, "serial console does not have"),
            (config, {migration.SERIAL_SLOT: unbound.fileno()}, "not its unix sockets"),
            (config, {migration.SERIAL_SLOT: a.fileno()}, "not its unix sockets"),
        ]
        for cfg, given, error in cases:
            dups = {slot: os.dup(fd) for slot, fd in given.items()}
            fds = dict(dups)
            with pytest.raises(MigrationError, match=error):
                migration._serial_backend(cfg, fds)
            assert not fds  # taken out, and closed
            for fd in dups.values():
                with pytest.raises(OSError):
                    os.fstat(fd)
        fds = {migration.SERIAL_SLOT: os.dup(listener.fileno()), migration.SERIAL_SLOT + 1: os.dup(a.fileno()), 0: 7}
        backend = migration._serial_backend(config, fds)
        assert backend is not None and fds == {0: 7} and not backend.owns_path
        backend.write(b"to the client")
        assert b.recv(100) == b"to the client"
        backend.close()


def test_tap_fds_are_matched_to_their_net_devices() -> None:
    config = m.VmConfig(payload=m.PayloadConfig(kernel="/k"), memory=m.MemoryConfig(size=4 * MIB),
                        net=[m.NetConfig(tap="a"), m.NetConfig(tap="b", num_queues=4)])
    fds = {0: 100, migration.tap_slot(1, 0): 101, migration.tap_slot(1, 1): 102, migration.tap_slot(0, 0): 103}
    assert migration._tap_fds_by_net(config, fds) == {0: [103], 1: [101, 102]}
    assert fds == {0: 100}  # the memory fd stays
    for wrong in ({migration.tap_slot(2, 0): 104}, {migration.tap_slot(1, 1): 105}):
        with pytest.raises(MigrationError, match="which no net device has"):
            migration._tap_fds_by_net(config, wrong)


def test_destination_refuses_tap_fds_for_a_vm_without_net_devices(tmp_path: Path) -> None:
    path = tmp_path / "r.sock"
    thread, errors, built = receiving(path)
    r, w = os.pipe()
    with connect(path) as s:
        proto.request(s, Command.START)
        proto.send_fd(s, migration.tap_slot(0, 0), r)
        proto.expect_ok(s, "tap fd")
        proto.send_request(s, Command.CONFIG, config_payload())
        assert proto.read_response(s) is Status.ERROR
    thread.join(10)
    os.close(w)
    os.close(r)
    assert "config was refused" in str(errors[0]) and "no net device" in str(errors[0].__cause__) and not built
