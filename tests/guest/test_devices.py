"""virtio-net, virtio-console, balloon, pmem and vsock in a real guest, with its own drivers.

Each xdist worker boots one guest with all of them (its tap on a subnet of its own) and
snapshots it; every test restores a clone. Clones of one worker run one at a time, so
each recreates the same host side (tap address, vsock socket) without a clash.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.guest.workers import worker_index
from vmsh.api.client import ApiClient
from vmsh.harness.waiting import wait_until

MAC = "52:54:00:aa:bb:cc"
MTU = 1400
PMEM_SIZE = 4 << 20


@pytest.fixture(scope="session")
def device_setup(vmsh_snapshots) -> dict:
    n = worker_index()
    root = Path(vmsh_snapshots.root) / f"devices-gw{n}"
    root.mkdir(exist_ok=True)
    pmem = root / "pmem.img"
    if not pmem.exists():
        with open(pmem, "wb") as f:
            f.truncate(PMEM_SIZE)
    host_ip, guest_ip = f"10.77.{n}.1", f"10.77.{n}.2"
    flags = ["--net", f"ip={host_ip},mask=255.255.255.0,mac={MAC},mtu={MTU}",
             "--balloon", "size=0", "--pmem", f"file={pmem}",
             "--vsock", f"cid=3,socket={root}/vsock.sock"]
    return {"flags": flags, "console": "pty", "host_ip": host_ip, "guest_ip": guest_ip, "root": root, "pmem": pmem}


@pytest.fixture
def guest(vmsh_guest, vmsh_snapshots, device_setup, tmp_path):
    api = tmp_path / "api.sock"
    snap = vmsh_snapshots.get(vmsh_guest.flags(*device_setup["flags"], console=device_setup["console"]))
    from vmsh.harness.snapshots import restore_guest

    clone = restore_guest(snap, tmp_path / "clone", extra_flags=["--api-socket", str(api)])
    clone.api = str(api)
    yield clone
    clone.close()


def up(guest, setup) -> None:
    guest.check_output(f"ip addr add {setup['guest_ip']}/24 dev eth0 && ip link set eth0 up")


def test_net_has_its_mac_and_mtu_and_pings_both_ways(guest, device_setup) -> None:
    assert guest.check_output("cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu").split() == [MAC, str(MTU)]
    up(guest, device_setup)
    assert " 0% packet loss" in guest.check_output(f"ping -c 2 -W 10 {device_setup['host_ip']}")
    # busybox (installed with busybox-static) has ping; the host may not have iputils
    host = subprocess.run(["busybox", "ping", "-c", "2", "-W", "10", device_setup["guest_ip"]], capture_output=True,
                          text=True,
                          check=False)
    assert host.returncode == 0, host.stdout + host.stderr


def test_net_tcp_transfers_both_ways(guest, device_setup) -> None:
    up(guest, device_setup)
    size = 256 << 10
    data = os.urandom(size)
    # host -> guest: the guest listens, the host sends
    guest.check_output("(nc -l -p 5000 > /tmp/in &)")

    def connect() -> socket.socket | None:
        try:
            return socket.create_connection((device_setup["guest_ip"], 5000), timeout=10)
        except OSError:
            return None  # refused until nc listens

    with wait_until(connect, 30, "the guest's nc to accept on port 5000", interval=0.2) as conn:
        conn.sendall(data)
    guest.check_output("while pidof nc >/dev/null; do sleep 0.2; done")
    assert guest.check_output("sha256sum /tmp/in").split()[0] == hashlib.sha256(data).hexdigest()
    # guest -> host: the host listens, the guest sends a file of its own
    received = bytearray()
    with socket.create_server((device_setup["host_ip"], 5001)) as server:
        server.settimeout(60)

        def accept() -> None:
            c, _ = server.accept()
            with c:
                while chunk := c.recv(65536):
                    received.extend(chunk)

        thread = threading.Thread(target=accept)
        thread.start()
        guest.check_output(f"nc {device_setup['host_ip']} 5001 < /tmp/in")
        thread.join(60)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(data).hexdigest()


def test_console_carries_text_both_ways(guest) -> None:
    with ApiClient(guest.api) as api:
        pty = api.get("vm.info")["config"]["console"]["file"]
    fd = os.open(pty, os.O_RDWR | os.O_NOCTTY)
    try:
        # The host writes only once head holds hvc0 open: input to a tty nobody has open is dropped.
        guest.check_output("stty -F /dev/hvc0 raw -echo; (head -n1 /dev/hvc0 > /tmp/from-host &); "
                           "until ls -l /proc/[0-9]*/fd 2>/dev/null | grep -q /dev/hvc0; do sleep 0.1; done")
        os.write(fd, b"hello-from-host\n")
        guest.check_output("while [ ! -s /tmp/from-host ]; do sleep 0.2; done")
        assert guest.check_output("cat /tmp/from-host") == "hello-from-host"
        guest.check_output("echo hello-from-guest > /dev/hvc0")
        seen = bytearray()

        def greeted() -> bool:
            if select.select([fd], [], [], 0.1)[0]:
                seen.extend(os.read(fd, 1024))
            return b"hello-from-guest" in seen

        wait_until(greeted, 30, "the guest's line on the console pty", interval=0)
    finally:
        os.close(fd)


def test_balloon_inflates_and_guest_memory_drops(guest) -> None:
    def mem_total_kib() -> int:
        return int(guest.check_output("grep MemTotal /proc/meminfo").split()[1])

    before = mem_total_kib()
    with ApiClient(guest.api) as api:
        api.put("vm.resize", {"desired_balloon": 64 << 20})
    # wait (up to 300 polls) for the guest to give the pages; the poll reads /proc/meminfo with
    # shell built-ins: a pipeline of processes per poll costs seconds on an emulating host
    guest.check_output("i=0; while :; do while read -r k v u; do [ \"$k\" = MemTotal: ] && break; "
                       f"done < /proc/meminfo; [ $v -le {before - 60 * 1024} ] || [ $i -ge 300 ] && break; "
                       "sleep 0.2; i=$((i+1)); done", timeout=180)
    after = mem_total_kib()
    assert before - after >= 63 * 1024, (before, after)
    with ApiClient(guest.api) as api:
        assert api.get("vm.counters")["__balloon"]["inflated_pages"] >= 16384
        # vm.info's memory_actual_size is the RAM less the balloon (cloud-hypervisor's vm_info),
        # once the driver has said how much it holds (``actual``)
        wait_until(lambda: api.get("vm.counters")["__balloon"]["actual_pages"] == 16384, 60,
                   "the driver to report the inflated balloon")
        info = api.get("vm.info")
        assert info["memory_actual_size"] == info["config"]["memory"]["size"] - (64 << 20)
        # and it grows back as the guest deflates
        api.put("vm.resize", {"desired_balloon": 0})
        wait_until(lambda: api.get("vm.counters")["__balloon"]["actual_pages"] == 0, 120,
                   "the driver to deflate the balloon")
        info = api.get("vm.info")
        assert info["memory_actual_size"] == info["config"]["memory"]["size"]


def test_pmem_is_mapped_and_its_data_reaches_the_file(guest, device_setup) -> None:
    assert guest.check_output("cat /sys/block/pmem0/size") == str(PMEM_SIZE // 512)
    marker = f"vmsh-pmem-{os.getpid()}-{time.monotonic_ns()}"
    guest.check_output(f"echo {marker} | dd of=/dev/pmem0 bs=4096 conv=sync oflag=direct 2>/dev/null; sync")
    with open(device_setup["pmem"], "rb") as f:
        assert f.read(len(marker)).decode() == marker


#: the guest port ``vsock listen`` takes, and the host port (served at the unix socket ``<socket>_5678``)
GUEST_PORT = 1234
HOST_PORT = 5678


def vsock_connect(setup: dict, port: int, timeout: float = 60) -> socket.socket:
    """A host stream to guest ``port`` through the device's unix socket, once the guest accepts.

    Until the guest program listens, the guest kernel resets the connection and the device
    closes the host stream, so this retries.
    """
    def connect() -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(str(setup["root"] / "vsock.sock"))
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n") and (byte := s.recv(1)):  # one byte at a time: data may follow
            line += byte
        if line:
            assert line.startswith(b"OK ") and int(line[3:]) >= 1 << 30, line
            return s
        s.close()
        return None

    return wait_until(connect, timeout, f"the guest to accept on vsock port {port}", interval=0.5)


def exchange(conn: socket.socket, data: bytes) -> bytes:
    """Send ``data`` while receiving until EOF (concurrently, so neither side waits on the
    other's buffers), then close; returns what was received."""
    received = bytearray()

    def receive() -> None:
        while chunk := conn.recv(1 << 16):
            received.extend(chunk)

    thread = threading.Thread(target=receive)
    thread.start()
    conn.sendall(data)
    thread.join(60)
    assert not thread.is_alive(), "the guest did not close its sending side"
    conn.close()
    return bytes(received)


def guest_sha256(guest, path: str) -> str:
    return guest.check_output(f"sha256sum {path}").split()[0]


def test_vsock_host_connects_to_a_listening_guest(guest, device_setup) -> None:
    assert guest.check_output("ls /dev/vsock") == "/dev/vsock"
    # nothing listens yet: the guest kernel resets, and the device closes the host stream
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(device_setup["root"] / "vsock.sock"))
        s.sendall(f"CONNECT {GUEST_PORT}\n".encode())
        assert s.recv(64) == b""
    data = os.urandom(256 << 10)
    # stdin from /dev/null: the guest shuts its sending side at once, the host still sends
    guest.check_output(f"vsock listen {GUEST_PORT} < /dev/null > /tmp/in &")
    assert exchange(vsock_connect(device_setup, GUEST_PORT), data) == b""
    guest.check_output("wait $!")  # the host's close ends the guest program, successfully
    assert guest_sha256(guest, "/tmp/in") == hashlib.sha256(data).hexdigest()


def test_vsock_guest_connects_to_a_listening_host(guest, device_setup) -> None:
    guest.check_output("dd if=/dev/urandom of=/tmp/out bs=65536 count=4 2>/dev/null")
    path = Path(f"{device_setup['root']}/vsock.sock_{HOST_PORT}")
    path.unlink(missing_ok=True)
    # nobody listens on the host: the device resets the guest's connection attempt
    refused = guest.run(f"vsock connect 2 {HOST_PORT} < /dev/null")
    assert refused.status == 1 and "connect: Connection reset by peer" in refused.output, refused
    received = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        server.settimeout(60)

        def accept() -> None:
            c, _ = server.accept()
            with c:
                c.settimeout(60)
                while chunk := c.recv(1 << 16):
                    received.extend(chunk)

        thread = threading.Thread(target=accept)
        thread.start()
        try:
            guest.check_output(f"vsock connect 2 {HOST_PORT} < /tmp/out > /tmp/reply")
        finally:
            thread.join(60)
            path.unlink(missing_ok=True)
    assert len(received) == 256 << 10
    assert hashlib.sha256(received).hexdigest() == guest_sha256(guest, "/tmp/out")
    assert guest.check_output("wc -c < /tmp/reply") == "0"


def test_vsock_carries_data_both_ways_on_one_connection(guest, device_setup) -> None:
    guest.check_output("dd if=/dev/urandom of=/tmp/out bs=65536 count=3 2>/dev/null")
    data = os.urandom(200 << 10)
    guest.check_output(f"vsock listen {GUEST_PORT} < /tmp/out > /tmp/in &")
    received = exchange(vsock_connect(device_setup, GUEST_PORT), data)
    guest.check_output("wait $!")
    assert len(received) == 3 << 16
    assert hashlib.sha256(received).hexdigest() == guest_sha256(guest, "/tmp/out")
    assert guest_sha256(guest, "/tmp/in") == hashlib.sha256(data).hexdigest()
