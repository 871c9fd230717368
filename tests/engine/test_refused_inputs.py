"""Inputs vmsh must refuse at once with a clear error (issue #16), on KVM with tiny kernels:
payloads that are not regular files within guest RAM, disk images in a format other than raw
(cold and hot-added), ``--console socket=``, a ``--gdb`` socket that cannot be created, and
device keys vmsh cannot act on when the device is hot-added (a vhost-user net must never become
a host tap, nor be plugged into a VM whose RAM the backend cannot share)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine import tiny_kernel
from tests.engine.conftest import run_now
from vmsh.config import model as m
from vmsh.config import normalize, vm_config_from_argv
from vmsh.engine.builder import build_for_boot
from vmsh.engine.events import EventMonitor
from vmsh.engine.vm import Vm
from vmsh.errors import VmshError, error_chain

LAUNCH = [sys.executable, "-m", "vmsh", "launch"]
RAM = 64 << 20
BASE = ["--serial", "null", "--console", "off", "--memory", f"size={RAM >> 20}M"]


@pytest.fixture
def kernel(tmp_path: Path) -> str:
    path = tmp_path / "hello.elf"
    path.write_bytes(tiny_kernel.hello_poweroff())
    return str(path)


def _not_loadable(kind: str, tmp_path: Path) -> str:
    """A FIFO (reading it blocks), /dev/zero (no end), a directory, a file larger than RAM."""
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
        return str(path)
    if kind == "big":
        path = tmp_path / "big"
        with open(path, "wb") as f:
            f.truncate(RAM + 1)
        return str(path)
    return {"zero": "/dev/zero", "dir": str(tmp_path)}[kind]


REASONS = {"fifo": "not a regular file", "zero": "not a regular file", "dir": "not a regular file",
           "big": f"it is {RAM + 1} bytes, larger than the guest's {RAM} bytes of RAM"}


def _build(argv: list[str]) -> Vm:
    return build_for_boot(normalize(vm_config_from_argv(argv)), EventMonitor(None), lambda kind, detail: None,
                          run_now)


def _refusal(argv: list[str]) -> str:
    with pytest.raises(VmshError) as info:
        _build(argv).shutdown()
    return ": ".join(error_chain(info.value))


@pytest.mark.parametrize("kind", sorted(REASONS))
@pytest.mark.parametrize("what", ["kernel", "firmware", "initramfs"])
def test_payload_that_is_not_a_regular_file_within_ram_is_refused(kernel: str, tmp_path: Path, kind: str,
                                                                  what: str) -> None:
    path = _not_loadable(kind, tmp_path)
    argv = [*BASE, f"--{what}", path] + (["--kernel", kernel] if what == "initramfs" else [])
    assert _refusal(argv) == f"Cannot load the {what} {path}: {REASONS[kind]}"


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_launch_refuses_such_a_kernel_at_once_without_a_traceback(tmp_path: Path, kind: str) -> None:
    path = _not_loadable(kind, tmp_path)
    result = subprocess.run([*LAUNCH, "--kernel", path, *BASE], capture_output=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.decode() == f"Cannot load the kernel {path}: {REASONS[kind]}\n"


QCOW2 = b"QFI\xfb\x00\x00\x00\x03"
VHDX = b"vhdxfile"


def _image(tmp_path: Path, fmt: str) -> str:
    path = tmp_path / f"disk.{fmt}"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
        if fmt == "qcow2":
            f.write(QCOW2)
        elif fmt == "VHDX":
            f.write(VHDX)
        elif fmt == "VHD":
            f.seek((1 << 20) - 512)
            f.write(b"conectix")
    return str(path)


# What opening each image of _image says: each carries only its format's signature, without a
# valid header, footer or headers.
REFUSALS = {
    "qcow2": "qcow2 image {path}: cluster_bits 0 out of range 9..21",
    "VHD": "VHD image {path}: footer checksum 0x00000000 does not match its contents",
    "VHDX": "VHDX image {path}: no valid header",
}


@pytest.mark.parametrize("fmt", ["qcow2", "VHD", "VHDX"])
def test_disk_image_with_a_broken_header_is_refused_cold(kernel: str, tmp_path: Path, fmt: str) -> None:
    path = _image(tmp_path, fmt)
    assert _refusal(["--kernel", kernel, *BASE, "--disk", f"path={path}"]).startswith(
        "--disk: cannot create _disk0: " + REFUSALS[fmt].format(path=path))


def test_console_socket_is_refused_as_cloud_hypervisor_does(kernel: str, tmp_path: Path) -> None:
    argv = ["--kernel", kernel, "--serial", "null", "--console", f"socket={tmp_path}/console.sock"]
    assert _refusal(argv) == "No socket option support for console device"
    result = subprocess.run([*LAUNCH, *argv], capture_output=True, timeout=60, check=False)
    assert (result.returncode, result.stderr) == (1, b"No socket option support for console device\n")


def test_gdb_socket_that_cannot_be_created_is_refused_by_launch(kernel: str, tmp_path: Path) -> None:
    path = tmp_path / "missing" / "gdb.sock"
    result = subprocess.run([*LAUNCH, "--kernel", kernel, *BASE, "--gdb", f"path={path}"],
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 1 and result.stderr.startswith(f"Cannot listen on the gdb socket {path}".encode()), \
        result.stderr


@pytest.fixture
def vm(kernel: str) -> Iterator[Vm]:
    machine = _build(["--kernel", kernel, *BASE])
    yield machine
    machine.shutdown()


def _links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


@pytest.mark.parametrize("kind, item, needle", [
    ("net", m.NetConfig(tap="vmshvu0", vhost_user=True, vhost_socket="/tmp/vu.sock", num_queues=4, id="hot0"),
     "--net vhost_user=on with num_queues above 2 (vmsh's vhost-user-net has one queue pair)"),
    ("net", m.NetConfig(tap="vmshvu0", vhost_user=True, vhost_socket="/tmp/vu.sock", id="hot0"),
     "--net tap with vhost_user=on (the backend moves the packets: there is no tap)"),
    ("disks", m.DiskConfig(vhost_user=True, vhost_socket="/tmp/vu.sock", serial="s", id="hot0"),
     "--disk serial with vhost_user=on (the backend's export decides it)"),
    ("disks", m.DiskConfig(path="{image}", id="hot0",
                           queue_affinity=[m.VirtQueueAffinity(queue_index=0, host_cpus=[0])]),
     "--disk queue_affinity (vmsh serves every queue of every disk on its one I/O thread)"),
])
def test_hot_add_refuses_what_cold_plug_refuses(vm: Vm, tmp_path: Path, kind: str, item: object,
                                                needle: str) -> None:
    image = tmp_path / "image"
    with open(image, "wb") as f:
        f.truncate(2 << 20)
    for attr in ("path", "file", "socket"):
        if isinstance(getattr(item, attr, None), str):
            setattr(item, attr, getattr(item, attr).format(image=image, dir=tmp_path))
    links = _links()
    with pytest.raises(VmshError, match=r"^Not supported by vmsh: ") as info:
        vm.hotplug_device(kind, item)
    assert needle in str(info.value)
    assert _links() == links, "no host interface was created"
    assert vm.devices is not None and "hot0" not in vm.devices.devices


@pytest.mark.parametrize("kind, item", [
    ("net", m.NetConfig(tap="vmshio0", iommu=True, id="hot0")),
    ("disks", m.DiskConfig(path="{image}", iommu=True, id="hot0")),
    ("pmem", m.PmemConfig(file="{image}", iommu=True, id="hot0")),
    ("vsock", m.VsockConfig(cid=3, socket="{dir}/v.sock", iommu=True, id="hot0")),
])
def test_hot_add_behind_the_iommu_needs_an_iommu_segment(vm: Vm, tmp_path: Path, kind: str, item: object) -> None:
    """cloud-hypervisor's InvalidIommuHotplug: the VIOT table written at boot lists only the boot
    devices and the IOMMU segments' slots, so a hot-added device cannot join elsewhere."""
    image = tmp_path / "image"
    with open(image, "wb") as f:
        f.truncate(2 << 20)
    for attr in ("path", "file", "socket"):
        if isinstance(getattr(item, attr, None), str):
            setattr(item, attr, getattr(item, attr).format(image=image, dir=tmp_path))
    links = _links()
    with pytest.raises(VmshError, match=r"^Invalid IOMMU hotplug"):
        vm.hotplug_device(kind, item)
    assert _links() == links, "no host interface was created"
    assert vm.devices is not None and "hot0" not in vm.devices.devices


@pytest.mark.parametrize("kind, item", [
    ("net", m.NetConfig(vhost_user=True, vhost_socket="{dir}/vu.sock", id="hot0")),
    ("disks", m.DiskConfig(vhost_user=True, vhost_socket="{dir}/vu.sock", id="hot0")),
])
def test_hot_added_vhost_user_device_needs_shared_ram(vm: Vm, tmp_path: Path, kind: str, item: object) -> None:
    """This VM's RAM is private: the backend could not see the guest's buffers, so the device is
    refused before any connection is tried, and a vhost-user net never becomes a host tap."""
    item.vhost_socket = item.vhost_socket.format(dir=tmp_path)
    links = _links()
    with pytest.raises(VmshError) as info:
        vm.hotplug_device(kind, item)
    assert "is not shared memory: vhost-user needs --memory shared=on" in ": ".join(error_chain(info.value))
    assert _links() == links, "no host interface was created"
    assert vm.devices is not None and "hot0" not in vm.devices.devices


@pytest.mark.parametrize("fmt", ["qcow2", "VHD", "VHDX"])
def test_hot_added_disk_image_with_a_broken_header_is_refused(vm: Vm, tmp_path: Path, fmt: str) -> None:
    path = _image(tmp_path, fmt)
    with pytest.raises(VmshError) as info:
        vm.hotplug_device("disks", m.DiskConfig(path=path, id="hot0"))
    assert REFUSALS[fmt].format(path=path) in ": ".join(error_chain(info.value))
    assert vm.devices is not None and "hot0" not in vm.devices.devices


@pytest.mark.parametrize("case", ["fifo", "zero", "console-socket"])
def test_api_boot_answers_with_the_error_and_keeps_serving(kernel: str, tmp_path: Path, case: str) -> None:
    """Over the API: ``vm.boot`` answers at once with the error (no 500 traceback, no hang on a
    FIFO, no gigabytes read from /dev/zero) and the API goes on answering."""
    from vmsh.api.client import ApiClient, ApiError
    from vmsh.harness.waiting import wait_until

    api = tmp_path / "api.sock"
    config: dict[str, object] = {"payload": {"kernel": kernel}, "memory": {"size": RAM},
                                 "serial": {"mode": "Null"}, "console": {"mode": "Off"}}
    if case == "console-socket":
        config["console"] = {"mode": "Socket", "socket": str(tmp_path / "console.sock")}
        expected = "No socket option support for console device"
    else:
        path = _not_loadable(case, tmp_path)
        config["payload"] = {"kernel": path}
        expected = f"Cannot load the kernel {path}: not a regular file"
    proc = subprocess.Popen([*LAUNCH, "--api-socket", str(api)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(api.exists, 30, f"the VMM's API socket {api}", process=proc)
        with ApiClient(str(api), timeout=20) as client:
            client.put("vm.create", config)
            with pytest.raises(ApiError) as info:
                client.put("vm.boot")
            assert info.value.messages == ["Error from API", *expected.split(": ")]
            assert not any("Traceback" in m or "AssertionError" in m for m in info.value.messages)
            assert client.get("vmm.ping")["version"]
    finally:
        proc.kill()
        proc.wait()
