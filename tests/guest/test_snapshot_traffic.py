"""Devices snapshot and restore mid-traffic, and a tap handed to vmsh as an fd (issue #6).

A clone of a booted guest starts I/O that a rate limit keeps in flight for several seconds;
the test pauses it through the API, snapshots it, kills its process, restores the snapshot
in a new process and checks that the I/O finishes there with the right data:

- block: a sequential read of the pattern disk piped into direct writes to a blank disk,
  both disks rate-limited;
- net: a TCP stream of the pattern disk's first sectors from the guest's ``nc`` to a
  listener in this process, over a tap the restored process reopens by name and configures
  again.

The data is known on the host (the pattern image) and compared there, not hashed in the
guest: on this PVM host guest user space sometimes loses SSE register contents (a busybox
``sha256sum`` prints a right hash with 16-byte runs of zeros in it, with or without a
snapshot), which would fail these tests for a reason that is not theirs.

"In flight" is checked, not assumed: at the snapshot the device counters show the transfer
unfinished, and the saved RAM holds requests the driver had made available that the device
had not taken (``avail.idx`` in the saved ring against the queue's saved ``next_avail``). If
a pause happens to catch a ring empty, the VM is resumed and paused again.

``--net fd=N`` gets a tap opened the way a caller would open one (blocking, plain
``TUNSETIFF``), passed through ``pass_fds``; the guest and the host ping each other over it.

Each xdist worker has its own tap names and 10.78.<worker>.x subnets. Data sizes are small
(at most 512 KiB): every guest kernel instruction is emulated on PVM hosts.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from vmsh.api.client import ApiClient
from vmsh.devices.backends.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETIFF, Tap
from vmsh.engine.persist import node_data, read_snapshot
from vmsh.errors import VmshError
from vmsh.harness.guest import Guest, GuestError
from vmsh.harness.snapshots import launch_argv, private_disks

KIB, MIB = 1 << 10, 1 << 20
#: Limits well below what the guest alone manages here (about 256 KiB/s from a disk, 25 KiB/s
#: of TCP in ~1 KiB segments), so the device is the bottleneck and requests wait in its rings.
DISK_RATE, NET_RATE = 64 * KIB, 8 * KIB
COPY_BYTES = 512 * KIB  # from the pattern disk to the blank one: about 8 s
SEND_BYTES = 96 * KIB  # over the net: about 12 s
#: a small guest: every snapshot writes its RAM
MEMORY = "size=128M"
MAC, HOST_MAC = "52:54:00:78:00:02", "52:54:00:78:00:01"
MASK = "255.255.255.240"  # two /28s per worker: the named tap's and the fd tap's
PORT = 5078
SEND_TIMEOUT = 180.0


def worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:] or 0) % 200


def pending_in_ring(snapshot: Path, dev_id: str, queue: int) -> int:
    """Chains the driver had made available in ``queue`` of ``dev_id`` but the device had not
    taken when ``snapshot`` was written: the ring's ``avail.idx`` (read from the saved RAM)
    minus the queue's saved ``next_avail``."""
    _, tree, memory = read_snapshot(str(snapshot))
    state = node_data(tree, f"device-manager/{dev_id}")["queues"][queue]
    ranges = node_data(tree, "memory-manager")["ranges"]
    # memory-ranges is the table's ranges concatenated; avail.idx sits 2 bytes into the ring
    address, offset = state["avail_ring"] + 2, 0
    for start, size in ranges:
        if start <= address < start + size:
            with open(memory, "rb") as f:
                f.seek(offset + address - start)
                avail_idx = struct.unpack("<H", f.read(2))[0]
            return (avail_idx - state["next_avail"]) & 0xFFFF
        offset += size
    raise AssertionError(f"{dev_id} queue {queue}: avail ring {address:#x} is outside the saved RAM")


def snapshot_in_flight(api: str, root: Path, rings: list[tuple[str, int]]) -> tuple[Path, dict]:
    """Pause and snapshot until every ``(device, queue)`` has requests waiting in its ring;
    returns the snapshot directory and the counters at that pause. The VM stays paused.

    After a snapshot the buckets are full again (they refill in host time, the guest's is
    stopped), so a retry lets the guest drain them first.
    """
    with ApiClient(api) as client:
        for attempt in range(4):
            client.put("vm.pause")
            snap = root / f"snap{attempt}"
            snap.mkdir(parents=True)
            client.put("vm.snapshot", {"destination_url": f"file://{snap}"})
            counters = client.get("vm.counters")
            pending = {ring: pending_in_ring(snap, *ring) for ring in rings}
            print(f"snapshot {attempt}: pending {pending}")
            if all(pending.values()):
                return snap, counters
            client.put("vm.resume")
            time.sleep(2.0)
    raise AssertionError(f"no pause caught requests in every ring of {rings}")


def wait_counter(api: str, dev_id: str, key: str, at_least: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with ApiClient(api) as client:
        while (value := client.get("vm.counters")[dev_id].get(key, 0)) < at_least:
            assert time.monotonic() < deadline, f"{dev_id}.{key} stuck at {value} (< {at_least})"
            time.sleep(0.2)


def clone(snapshot: Path, workdir: Path) -> Guest:
    """A restored clone on private copies of the snapshot's disks, with an API socket of its
    own (``guest.api``).

    Nothing is typed until the API says the VM runs: the engine starts the serial input
    before it restores the irqchip and vCPU state, so a byte that arrives in between raises
    an interrupt that the restore then wipes out, and the full receive FIFO never raises
    another (the guest shell waits forever). ``restore_guest`` types at once and hits that
    whenever the process starts fast enough.
    """
    api = workdir.parent / f"{workdir.name}.sock"
    own = private_disks(snapshot, workdir / "snapshot")
    guest = Guest(launch_argv(["--restore", f"source_url=file://{own.resolve()},resume=on", "--api-socket", str(api)]),
                  workdir=workdir, boot_timeout=120)
    guest.start()
    try:
        deadline = time.monotonic() + 120
        while not running(api):
            if time.monotonic() > deadline or guest.exit_status() is not None:
                raise GuestError(f"the restored VM did not start running\n{guest.console_tail()}")
            time.sleep(0.05)
        guest.mark_shell_ready()
        guest.check_output("true", timeout=120)
    except BaseException:
        guest.close()
        raise
    guest.api = str(api)  # type: ignore[attr-defined]  # the test keeps the API socket beside its guest
    return guest


def running(api: Path) -> bool:
    try:
        with ApiClient(str(api)) as client:
            return client.get("vm.info").get("state") == "Running"
    except VmshError:  # no socket yet, or no VM yet (ApiError is one too)
        return False


# --- block -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def blank_disk(vmsh_snapshots) -> Path:
    """A zeroed 4 MiB image shared by every worker's snapshot (clones write to private copies)."""
    root = Path(vmsh_snapshots.root)
    path = root / "traffic-blank.img"
    with open(root / "traffic-blank.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            with open(root / "traffic-blank.tmp", "wb") as f:
                f.truncate(4 * MIB)
            (root / "traffic-blank.tmp").rename(path)
    return path


def test_disk_reads_and_writes_in_flight_finish_in_a_restored_clone(vmsh_guest, vmsh_snapshots, vmsh_image,
                                                                      blank_disk, tmp_path) -> None:
    raw = Path(vmsh_image("raw-disk"))
    snap = vmsh_snapshots.get(vmsh_guest.flags(
        "--memory", MEMORY, "--disk", f"path={raw},readonly=on,bw_size={DISK_RATE},bw_refill_time=1000,id=src",
        f"path={blank_disk},bw_size={DISK_RATE},bw_refill_time=1000,id=dst"))
    first = clone(snap, tmp_path / "first")
    try:
        # fullblock: a pipe can hand dd less than a block, and O_DIRECT takes whole sectors only
        first.check_output(f"((dd if=/dev/vda bs=64k count={COPY_BYTES // (64 * KIB)} 2>/dev/null | "
                           "dd of=/dev/vdb bs=64k iflag=fullblock oflag=direct 2>/dev/null; "
                           "echo $? > /tmp/copy.rc) &)")
        # both disks past their first buckets: from here on they are throttled
        wait_counter(first.api, "src", "read_bytes", 128 * KIB)
        wait_counter(first.api, "dst", "write_bytes", 128 * KIB)
        time.sleep(0.5)  # not just as a request completes, when the next may not be queued yet
        saved, at_pause = snapshot_in_flight(first.api, tmp_path, [("src", 0), ("dst", 0)])
    finally:
        first.close()
    assert at_pause["src"]["read_bytes"] < COPY_BYTES and at_pause["dst"]["write_bytes"] < COPY_BYTES, at_pause
    assert at_pause["src"]["throttled"] >= 1 and at_pause["dst"]["throttled"] >= 1, at_pause

    start = time.monotonic()
    second = clone(saved, tmp_path / "second")
    try:
        second.check_output("while [ ! -s /tmp/copy.rc ]; do sleep 0.5; done", timeout=SEND_TIMEOUT)
        print(f"I/O finished {time.monotonic() - start:.1f} s after the restore began")
        assert second.check_output("cat /tmp/copy.rc") == "0"
        with ApiClient(second.api) as client:
            after = client.get("vm.counters")
        # the counters came back with the snapshot and the restored devices did the rest
        assert after["src"]["read_bytes"] > at_pause["src"]["read_bytes"], (at_pause, after)
        assert after["dst"]["write_bytes"] >= COPY_BYTES > at_pause["dst"]["write_bytes"], (at_pause, after)
    finally:
        second.close()
    # What was read before and after the move and written before and after it is all in the
    # restored clone's own copy of the blank disk.
    with open(tmp_path / "second" / "snapshot" / "disk-dst.img", "rb") as f:
        copied = f.read(COPY_BYTES)
    expected = raw.read_bytes()[:COPY_BYTES]
    assert copied == expected, next(i for i in range(COPY_BYTES) if copied[i] != expected[i])


# --- net -------------------------------------------------------------------------------------------


class Receiver:
    """A TCP listener on the host side of the tap that takes one connection and keeps what it
    receives until the sender closes."""

    def __init__(self, address: str) -> None:
        self.server = socket.create_server((address, PORT))
        self.server.settimeout(SEND_TIMEOUT)
        self.data = bytearray()
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.server.accept()
            with conn:
                conn.settimeout(SEND_TIMEOUT)
                while chunk := conn.recv(65536):
                    self.data.extend(chunk)
        except OSError as err:  # reported by wait()
            self.error = err

    def wait(self, timeout: float) -> bytes:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the transfer did not end within {timeout} s ({len(self.data)} bytes)"
        if self.error is not None:
            raise self.error
        return bytes(self.data)

    def close(self) -> None:
        self.server.close()


def test_tcp_stream_in_flight_finishes_in_a_restored_clone(vmsh_guest, vmsh_snapshots, vmsh_image, tmp_path) -> None:
    n = worker_index()
    host_ip, guest_ip = f"10.78.{n}.1", f"10.78.{n}.2"
    raw = Path(vmsh_image("raw-disk"))  # what the guest sends
    # A fixed host MAC: the restored guest's ARP cache still names the old tap's.
    snap = vmsh_snapshots.get(vmsh_guest.flags(
        "--memory", MEMORY, "--disk", f"path={raw},readonly=on",
        "--net", f"tap=vmshtr{n},ip={host_ip},mask={MASK},mac={MAC},host_mac={HOST_MAC},"
                 f"id=net0,bw_size={NET_RATE},bw_refill_time=1000"))
    first = clone(snap, tmp_path / "first")
    try:
        first.check_output(f"ip addr add {guest_ip}/28 dev eth0 && ip link set eth0 up")
        receiver = Receiver(host_ip)  # bound to the host address, which lives on the tap
    except BaseException:
        first.close()
        raise
    try:
        try:
            first.check_output(f"((dd if=/dev/vda bs=4k count={SEND_BYTES // (4 * KIB)} 2>/dev/null | "
                               f"nc {host_ip} {PORT}; echo $? > /tmp/nc.rc) &)")
            wait_counter(first.api, "net0", "tx_bytes", 24 * KIB)
            saved, at_pause = snapshot_in_flight(first.api, tmp_path, [("net0", 1)])  # the transmit queue
            received_at_pause = len(receiver.data)
        finally:
            first.close()
        assert at_pause["net0"]["tx_bytes"] < SEND_BYTES and received_at_pause < SEND_BYTES, \
            (at_pause, received_at_pause)
        assert at_pause["net0"]["tx_throttled"] >= 1, at_pause

        # The tap went away with the first process; the second opens it again by name and
        # gives it its address back; the guest sends what waited in its ring, and TCP resends
        # whatever was lost in between.
        start = time.monotonic()
        second = clone(saved, tmp_path / "second")
        try:
            data = receiver.wait(SEND_TIMEOUT)
            print(f"stream finished {time.monotonic() - start:.1f} s after the restore began")
            assert len(data) == SEND_BYTES and data == raw.read_bytes()[:SEND_BYTES], len(data)
            second.check_output("while [ ! -s /tmp/nc.rc ]; do sleep 0.2; done")
            assert second.check_output("cat /tmp/nc.rc") == "0"
        finally:
            second.close()
    finally:
        receiver.close()


# --- a tap passed as an fd -------------------------------------------------------------------------


def caller_tap(name: str) -> int:
    """A tap opened as a caller of ``vmsh launch --net fd=`` would: a blocking fd with a
    vnet header and nothing else set up; inheritable, so the VMM can get it."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        flags = struct.pack("<H", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, name.encode().ljust(16, b"\0") + flags.ljust(24, b"\0"))
    except OSError:
        os.close(fd)
        raise
    os.set_inheritable(fd, True)
    return fd


def test_net_on_a_tap_passed_as_an_fd(vmsh_guest, tmp_path) -> None:
    n = worker_index()
    host_ip, guest_ip = f"10.78.{n}.17", f"10.78.{n}.18"
    name = f"vmshfd{n}"
    fd = caller_tap(name)
    try:
        Tap(name, []).configure(ip=host_ip, mask=MASK, mac=HOST_MAC)  # the caller's host side
        # A boot of its own, not a clone: a cached snapshot's boot cannot be handed the fd, and
        # a restore cannot take a new one yet (vmsh ignores --restore net_fds=).
        flags = vmsh_guest.flags("--memory", MEMORY, "--net", f"fd={fd},mac={MAC}")
        with Guest(launch_argv(flags), workdir=tmp_path / "guest", boot_timeout=vmsh_guest.boot_timeout,
                   pass_fds=(fd,)) as guest:
            guest.wait_ready()
            assert guest.check_output("cat /sys/class/net/eth0/address") == MAC
            guest.check_output(f"ip addr add {guest_ip}/28 dev eth0 && ip link set eth0 up")
            guest.check_output(f"ping -c 2 -W 10 {host_ip}", timeout=120)  # fails unless a reply came
            host = subprocess.run(["busybox", "ping", "-c", "2", "-W", "10", guest_ip],
                                  check=False, capture_output=True, text=True, timeout=120)
            assert host.returncode == 0, host.stdout + host.stderr
    finally:
        os.close(fd)
