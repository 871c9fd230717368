"""Live migration of a real guest between two VMM processes (``vm.send-migration`` /
``vm.receive-migration`` through ``vmsh remote``, cloud-hypervisor's ``unix:`` sockets).

One restored clone with a disk and its serial console on the VMM's terminal is migrated by
copying to a VMM started with only ``--api-socket`` (the clone's config asks for shared RAM, so
the destination's RAM is a memfd), then from there with ``local`` (the RAM's fds pass over the
socket) to a third; the guest's shell answers on each new VMM's console, keeps what it wrote to
RAM and to its disk, and each source VMM exits. Refusals leave the source guest running: a
``local`` migration of RAM that is not shared (the clone's copy-on-write snapshot mapping), and
a destination that cannot open the guest's disk.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from pexpect import fdpexpect

from tests.guest.workers import worker_index
from vmsh.api.client import ApiClient
from vmsh.harness.guest import Guest
from vmsh.harness.migrate import migrate_guest, start_receiver
from vmsh.harness.shellproto import READY_MARKER
from vmsh.harness.waiting import wait_until

DISK_SIZE = 8 << 20


def remote(api: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmsh", "remote", "--api-socket", str(api), *args],
                          capture_output=True, text=True, timeout=300, check=False)


def destination(tmp_path: Path, name: str) -> tuple[Guest, Path]:
    return start_receiver(tmp_path, name, log_flags(tmp_path, name))


def log_flags(tmp_path: Path, name: str) -> list[str]:
    return ["-v", "--log-file", str(tmp_path / f"{name}.log")]


def migrate(source_api: Path, dest_api: Path, sock: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str],
                                                                                 subprocess.CompletedProcess[str]]:
    """Through ``vmsh remote``: receive on ``dest_api`` (the call blocks until the migration
    ends) and send from ``source_api``; returns both results (send, receive)."""
    received: list[subprocess.CompletedProcess[str]] = []
    thread = threading.Thread(target=lambda: received.append(remote(dest_api, "receive-migration", f"unix:{sock}")))
    thread.start()
    wait_until(sock.exists, 30, f"the migration socket {sock}", interval=0.05)
    sent = remote(source_api, "send-migration", *flags, f"unix:{sock}")
    thread.join(120)
    assert received, "the receive-migration call did not return"
    return sent, received[0]


def test_guest_migrates_by_copy_then_locally_and_refusals_leave_it_running(vmsh_clone, tmp_path: Path) -> None:
    disk = tmp_path / "data.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    api = tmp_path / "src.sock"
    source = vmsh_clone("--memory", "size=256M,shared=on", "--disk", f"path={disk}",
                        restore_flags=["--api-socket", f"path={api}", "-v", "--log-file", str(tmp_path / "src.log")])
    source.check_output("echo in-ram > /tmp/mark; printf on-disk | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null")

    # local=true needs shared RAM: the clone's RAM is the snapshot file mapped copy-on-write
    dest, dest_api = destination(tmp_path, "dest0")
    sent, received = migrate(api, dest_api, tmp_path / "m0.sock", "--local")
    assert sent.returncode != 0 and "Local migration requires shared memory" in sent.stderr, sent
    assert received.returncode != 0, received
    assert source.check_output("cat /tmp/mark") == "in-ram"
    dest.close()

    # a destination that cannot open the guest's disk refuses the config; the source runs on
    # (the clone's disk is its private copy of the snapshot's: the path its config names)
    with ApiClient(str(api)) as client:
        used = Path(client.get("vm.info")["config"]["disks"][0]["path"])
    hidden = used.with_suffix(".hidden")
    os.rename(used, hidden)
    try:
        dest, dest_api = destination(tmp_path, "dest1")
        sent, received = migrate(api, dest_api, tmp_path / "m1.sock")
        assert sent.returncode != 0 and "refused" in sent.stderr, sent
        assert received.returncode != 0 and "cannot be opened here" in received.stderr, received
        with_info = remote(dest_api, "info")
        assert with_info.returncode != 0, with_info  # no VM left behind on the destination
        dest.close()
    finally:
        os.rename(hidden, used)
    assert source.check_output("cat /tmp/mark") == "in-ram"

    # copying migration while the guest writes to RAM: the guest answers on the destination's
    # console with its counter still counting, the source exits
    source.check_output("(i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; "
                        "done) >/dev/null 2>&1 &")
    counts = [int(source.check_output("sleep 0.2; cat /tmp/count")) for _ in range(2)]
    assert 0 < counts[0] < counts[1], counts
    # (with the harness's helper, as a test moves a guest mid-test)
    first = migrate_guest(source, tmp_path, name="dest2", extra_flags=log_flags(tmp_path, "dest2"))
    assert source.wait_exit(60) == 0
    assert first.check_output("cat /tmp/mark; dd if=/dev/vda bs=7 count=1 2>/dev/null") == "in-ram\non-disk"
    counts = [int(first.check_output("cat /tmp/count")) for _ in range(2)]
    assert 0 < counts[0] < counts[1], counts
    first.check_output("kill %1; echo second > /tmp/mark2")

    # local migration from there: the destination maps the same memfds
    second, second_api = destination(tmp_path, "dest3")
    sent, received = migrate(tmp_path / "dest2.sock", second_api, tmp_path / "m3.sock", "--local")
    assert sent.returncode == 0, sent
    assert received.returncode == 0, received
    assert first.wait_exit(60) == 0
    assert second.check_output("cat /tmp/mark /tmp/mark2; dd if=/dev/vda bs=7 count=1 2>/dev/null") == \
        "in-ram\nsecond\non-disk"
    info = remote(second_api, "info")
    assert info.returncode == 0 and '"Running"' in info.stdout, info
    second.close()


# --- devices in use across a migration ----------------------------------------------------------------

KIB = 1024
RATE = 16 * KIB  # both the stream and the copy run throttled, so each lasts across two migrations
SEND_BYTES = 160 * KIB  # over the tap: about 10 s
COPY_BYTES = 192 * KIB  # disk to disk: about 12 s (read and write each throttled)
PORT = 5079
MASK = "255.255.255.240"


def test_tcp_stream_and_disk_copy_run_across_migrations(vmsh_clone, vmsh_image, tmp_path: Path) -> None:
    n = worker_index()
    host_ip, guest_ip = f"10.79.{n}.1", f"10.79.{n}.2"
    raw = Path(vmsh_image("raw-disk"))
    blank = tmp_path / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(DISK_SIZE)
    api = tmp_path / "src.sock"
    limit = f"bw_size={RATE},bw_refill_time=1000"
    source = vmsh_clone("--memory", "size=256M,shared=on",
                        "--disk", f"path={raw},readonly=on,{limit},id=src", f"path={blank},{limit},id=dst",
                        "--net", f"tap=vmshmg{n},ip={host_ip},mask={MASK},id=net0,{limit}",
                        "--vsock", f"cid=3,socket={tmp_path / 'vsock.sock'}",
                        restore_flags=["--api-socket", f"path={api}", *log_flags(tmp_path, "src")])
    server = socket.create_server((host_ip, PORT))
    server.settimeout(120)
    received = bytearray()

    def take() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(120)
            while chunk := conn.recv(65536):
                received.extend(chunk)

    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    try:
        source.check_output(f"ip addr add {guest_ip}/28 dev eth0 && ip link set eth0 up")
        source.check_output(f"((dd if=/dev/vda bs=4k count={SEND_BYTES // (4 * KIB)} 2>/dev/null | "
                            f"nc {host_ip} {PORT}; echo $? > /tmp/nc.rc) &)")
        source.check_output(f"((dd if=/dev/vda bs=4k count={COPY_BYTES // (4 * KIB)} skip=64 2>/dev/null | "
                            "dd of=/dev/vdb bs=4k iflag=fullblock oflag=direct 2>/dev/null; "
                            "echo $? > /tmp/copy.rc) &)")
        wait_until(lambda: len(received) >= 16 * KIB, 60, "the stream's first bytes", interval=0.1)
        # copying (the tap's fd passes over the unix socket; the source still holds the tap)
        first = migrate_guest(source, tmp_path, name="dest0", extra_flags=log_flags(tmp_path, "dest0"))
        assert source.wait_exit(60) == 0
        assert first.check_output("ls /tmp/nc.rc /tmp/copy.rc 2>/dev/null | wc -l") == "0", \
            "the stream or the copy ended before the second migration"
        # local: RAM and the tap both by fd
        second = migrate_guest(first, tmp_path, local=True, name="dest1", extra_flags=log_flags(tmp_path, "dest1"))
        assert first.wait_exit(60) == 0
        taker.join(120)
        assert not taker.is_alive(), f"the stream did not end ({len(received)} bytes)"
        expected = raw.read_bytes()
        assert len(received) == SEND_BYTES and received == expected[:SEND_BYTES], len(received)
        second.check_output("while [ ! -s /tmp/nc.rc ] || [ ! -s /tmp/copy.rc ]; do sleep 0.2; done", timeout=120)
        assert second.check_output("cat /tmp/nc.rc /tmp/copy.rc") == "0\n0"
        # the clone's disks are its private copies of the snapshot's: the paths its config names
        with ApiClient(str(tmp_path / "dest1.sock")) as client:
            copied = Path(client.get("vm.info")["config"]["disks"][1]["path"])
        assert copied.read_bytes()[:COPY_BYTES] == expected[64 * 4 * KIB:64 * 4 * KIB + COPY_BYTES]
        second.check_output(f"ping -c 1 -W 10 {host_ip}", timeout=60)
        # vsock: the destination took the socket path over (the source's exit left it in place)
        data = os.urandom(64 << 10)
        second.check_output("vsock listen 1234 < /dev/null > /tmp/in &")
        assert vsock_send(tmp_path / "vsock.sock", 1234, data) == b""
        second.check_output("wait $!")
        assert second.check_output("sha256sum /tmp/in").split()[0] == hashlib.sha256(data).hexdigest()
        second.close()
    finally:
        server.close()


def vsock_send(path: Path, port: int, data: bytes) -> bytes:
    """Send ``data`` to guest ``port`` through the vsock device's unix socket (retried until the
    guest listens), then close; returns what the guest sent back."""
    def connect() -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n") and (byte := s.recv(1)):
            line += byte
        if line.startswith(b"OK "):
            return s
        s.close()
        return None

    conn = wait_until(connect, 60, f"the guest to accept on vsock port {port}", interval=0.5)
    with conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := conn.recv(1 << 16):
            received.extend(chunk)
    return bytes(received)


def test_a_pty_console_moves_to_a_new_pty(vmsh_clone, tmp_path: Path) -> None:
    api = tmp_path / "src.sock"
    source = vmsh_clone("--memory", "size=256M,shared=on", console="pty",
                        restore_flags=["--api-socket", f"path={api}", *log_flags(tmp_path, "src")])
    with ApiClient(str(api)) as client:
        before = client.get("vm.info")["config"]["console"]["file"]
    moved = migrate_guest(source, tmp_path, name="dest0", extra_flags=log_flags(tmp_path, "dest0"))
    assert source.wait_exit(60) == 0
    with ApiClient(str(tmp_path / "dest0.sock")) as client:
        after = client.get("vm.info")["config"]["console"]["file"]
    # the destination's own pty (vm.info names it), where the guest's virtio console now writes
    assert after and after.startswith("/dev/pts/") and after != before, (before, after)
    fd = os.open(after, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        moved.check_output("echo PTY-MOVED > /dev/hvc0")
        seen = bytearray()

        def got() -> bool:
            try:
                seen.extend(os.read(fd, 4096))
            except BlockingIOError:
                pass
            return b"PTY-MOVED" in seen

        wait_until(got, 30, f"the guest's line on {after} (was {before})", interval=0.1)
    finally:
        os.close(fd)
    moved.close()


def test_a_serial_socket_client_stays_connected_across_migrations(vmsh_guest, tmp_path: Path) -> None:
    """``--serial socket=``: one client connection drives the guest's shell before, between and
    after a copying and a ``local`` migration; what it types while the guest is paused reaches
    the guest on the destination; each source exits leaving the socket path to the next VMM."""
    con, api = tmp_path / "serial.sock", tmp_path / "src.sock"
    source = vmsh_guest("--memory", "size=256M,shared=on", "--api-socket", f"path={api}",
                        *log_flags(tmp_path, "src"), serial=f"socket={con}", ready=False)
    wait_until(con.exists, 60, f"the serial socket {con}", interval=0.02, process=source.exit_status)
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(con))
    shell = fdpexpect.fdspawn(client.fileno(), timeout=source.boot_timeout, encoding="utf-8",
                              codec_errors="replace")

    def answers(tag: str) -> None:
        shell.send(f"echo {tag[:3]}''{tag[3:]}\n")  # the echo of the typed line does not match
        shell.expect(tag, timeout=120)

    try:
        shell.expect(READY_MARKER)
        answers("ON-THE-SOURCE")
        first = migrate_guest(source, tmp_path, name="dest1", extra_flags=log_flags(tmp_path, "dest1"))
        assert source.wait_exit(60) == 0
        assert con.exists()  # the source left the path to the destination, which listens there
        answers("AFTER-COPY")
        with ApiClient(str(tmp_path / "dest1.sock")) as api_client:
            api_client.put("vm.pause")
            shell.send("echo TYPED''-WHILE-PAUSED\n")  # waits in the socket for the guest
            second = migrate_guest(first, tmp_path, local=True, name="dest2",
                                   extra_flags=log_flags(tmp_path, "dest2"))
        assert first.wait_exit(60) == 0  # the destination runs the guest (it resumes it, as v40)
        shell.expect("TYPED-WHILE-PAUSED", timeout=120)
        answers("AFTER-LOCAL")
        client.close()
        # a new client gets the shell from the VMM that runs the guest now
        later = socket.socket(socket.AF_UNIX)
        later.connect(str(con))
        again = fdpexpect.fdspawn(later.fileno(), timeout=120, encoding="utf-8", codec_errors="replace")
        again.send("echo NEW''-CLIENT\n")
        again.expect("NEW-CLIENT")
        later.close()
        second.close()
        wait_until(lambda: not con.exists(), 30, f"the destination to remove {con} at exit", interval=0.05)
    finally:
        client.close()
