"""Asynchronous block I/O seen from a real guest: each back-end serves the guest's reads and
writes with the right data, and ``--disk _disable_io_uring`` / ``_disable_aio`` choose it.

One snapshot of a guest with three writable raw disks: ``vda`` with the default (io_uring on this
host), ``vdb`` with ``_disable_io_uring=on`` (Linux AIO), ``vdc`` with both disabled (synchronous
``preadv``/``pwritev``). The guest writes real data (its busybox binary) with ``O_DIRECT`` to each,
reads it back, and the checksums in the guest, read back and in the clone's host file agree; the
device counters say which back-end served the requests (``io_uring_ops``, ``aio_ops``, neither).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from vmsh.api.client import ApiClient
from vmsh.harness.snapshots import restore_guest

DISK_MIB = 4
#: where the data goes: 1 MiB in, so that it is not at the start of the disk
SEEK_KIB = 1024
DISKS = {"io_uring": ("vda", ""), "aio": ("vdb", ",_disable_io_uring=on"),
         "sync": ("vdc", ",_disable_io_uring=on,_disable_aio=on")}


@pytest.fixture
def guest(vmsh_guest, vmsh_snapshots, tmp_path_factory):
    root = tmp_path_factory.mktemp("async-disks")
    flags = ["--disk"]
    for name, (_, keys) in DISKS.items():
        path = root / f"{name}.raw"
        path.write_bytes(bytes(DISK_MIB << 20))
        flags.append(f"path={path},id={name}{keys}")
    snap = vmsh_snapshots.get(vmsh_guest.flags(*flags))
    workdir = tmp_path_factory.mktemp("async-clone")
    api = workdir / "api.sock"
    clone = restore_guest(snap, workdir / "clone", extra_flags=["--api-socket", str(api)])
    clone.api = str(api)
    yield clone
    clone.close()


def counters(guest) -> dict[str, dict[str, int]]:
    with ApiClient(guest.api) as api:
        return api.get("vm.counters")


@pytest.mark.parametrize("backend", list(DISKS))
def test_guest_data_goes_through_the_chosen_backend(guest, backend: str) -> None:
    dev, _ = DISKS[backend]
    before = counters(guest)[backend]
    # Real data without generating it (every guest kernel instruction is emulated on PVM hosts):
    # the first 256 KiB of the guest's busybox binary.
    size = 256 << 10
    written = guest.check_output(f"head -c {size} /bin/busybox | sha256sum", timeout=300).split()[0]
    guest.check_output(f"dd if=/bin/busybox of=/dev/{dev} bs=64k count=4 seek={SEEK_KIB // 64} oflag=direct "
                       "conv=fsync 2>/dev/null", timeout=300)
    read = guest.check_output(f"dd if=/dev/{dev} bs=64k skip={SEEK_KIB // 64} count=4 iflag=direct 2>/dev/null "
                              "| sha256sum", timeout=300).split()[0]
    after = counters(guest)[backend]
    assert read == written
    host = (Path(guest.workdir) / "snapshot" / f"disk-{backend}.img").read_bytes()
    assert hashlib.sha256(host[SEEK_KIB << 10:(SEEK_KIB << 10) + size]).hexdigest() == written
    assert after["write_ops"] > before["write_ops"] and after["read_ops"] > before["read_ops"]
    assert after["flush_ops"] > before["flush_ops"]  # conv=fsync
    served = {key: after[key] - before.get(key, 0) for key in ("io_uring_ops", "aio_ops") if key in after}
    if backend == "sync":
        assert served == {}, after
    else:
        # every read, write and flush went through the kernel queue
        assert served == {f"{backend}_ops": sum(after[k] - before[k] for k in ("read_ops", "write_ops", "flush_ops"))}
