"""Real Linux guests booted by ``vmsh launch``: kernel formats, CPUs, memory, command line,
DMI/SMBIOS, poweroff and reboot."""

from __future__ import annotations

import re

import pytest

from tests.guest.eventlog import events_of
from vmsh.harness.pytest_plugin import DEFAULT_CMDLINE
from vmsh.harness.waiting import wait_until


@pytest.mark.parametrize("kernel", ["vmlinux", "kernel"])
def test_both_kernel_formats_boot_to_a_shell(vmsh_guest, kernel: str) -> None:
    guest = vmsh_guest(kernel=kernel)
    assert guest.check_output("echo $((6 * 7))") == "42"


@pytest.mark.parametrize("cpus", [1, 2])
def test_nproc_matches_boot_vcpus(vmsh_guest, cpus: int) -> None:
    guest = vmsh_guest("--cpus", f"boot={cpus}")
    assert guest.check_output("nproc") == str(cpus)
    assert guest.check_output("grep -c ^processor /proc/cpuinfo") == str(cpus)


def _cpu_list(cpus: list[int]) -> str:
    """Linux's cpulist format for consecutive cpus ("4-5", or "4")."""
    return f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else f"{cpus[0]}"


@pytest.mark.parametrize("topology", ["1:3:2:1", "2:1:1:2"])
def test_guest_sees_the_configured_cpu_topology(vmsh_guest, topology: str) -> None:
    """``--cpus topology=threads:cores:dies:packages`` reaches the guest's view of its CPUs, on
    hosts whose KVM does not describe a topology itself (vmsh writes CPUID's topology leaves).
    Three cores per die make the x2APIC ids sparse (0-2, 4-6, as cloud-hypervisor numbers them),
    two dies need leaf 0x1F, two packages the package level, two threads the SMT level. (Each
    vCPU costs a PVM host seconds of boot: the topologies are small.)"""
    threads, cores, dies, packages = (int(p) for p in topology.split(":"))
    count = threads * cores * dies * packages
    guest = vmsh_guest("--cpus", f"boot={count},topology={topology}")
    script = ("for c in /sys/devices/system/cpu/cpu[0-9]*; do t=$c/topology; echo ${c##*cpu}"
              " $(cat $t/physical_package_id $t/die_id $t/core_id $t/thread_siblings_list); done")
    seen = {}
    for line in guest.check_output(script, timeout=60).splitlines():
        cpu, package, die, core, siblings = line.split()
        seen[int(cpu)] = (int(package), int(die), int(core), siblings)
    core_bits = (cores - 1).bit_length()
    expected = {}
    for cpu in range(count):
        core, die = cpu // threads % cores, cpu // (threads * cores) % dies
        first = cpu - cpu % threads
        expected[cpu] = (cpu // (threads * cores * dies), die, core | die << core_bits,
                         _cpu_list(list(range(first, first + threads))))
    assert seen == expected
    # /proc/cpuinfo per processor: physical id, siblings (logical per package), core id, cpu cores
    fields = guest.check_output("awk -F': ' '/^(physical id|siblings|core id|cpu cores)/ {print $2}' /proc/cpuinfo")
    numbers = [int(n) for n in fields.split()]
    rows = [tuple(numbers[i:i + 4]) for i in range(0, len(numbers), 4)]
    assert rows == [(expected[cpu][0], threads * cores * dies, expected[cpu][2], cores * dies) for cpu in range(count)]


def test_memtotal_matches_memory(vmsh_guest) -> None:
    guest = vmsh_guest("--memory", "size=192M")
    kib = int(guest.check_output("awk '/MemTotal/ {print $2}' /proc/meminfo"))
    # The kernel keeps its own image and early reservations out of MemTotal.
    assert 150 * 1024 < kib <= 192 * 1024


def test_cmdline_is_exactly_the_given_one(vmsh_guest) -> None:
    cmdline = DEFAULT_CMDLINE + " vmsh.test=a,b,c"
    guest = vmsh_guest(cmdline=cmdline)
    assert guest.check_output("cat /proc/cmdline") == cmdline


def test_dmi_from_platform(vmsh_guest) -> None:
    uuid = "4f1a8a3e-2b6c-4d3e-9f10-1234567890ab"
    guest = vmsh_guest("--platform", f"serial_number=VMSH-SN-1,uuid={uuid},oem_strings=[vmsh-oem-one,vmsh-oem-two]")
    assert guest.check_output("cat /sys/class/dmi/id/product_serial") == "VMSH-SN-1"
    assert guest.check_output("cat /sys/class/dmi/id/product_uuid") == uuid
    assert guest.check_output("cat /sys/class/dmi/id/sys_vendor") == "Cloud Hypervisor"
    # The raw SMBIOS table: the type 11 strings follow its formatted part, NUL-separated.
    table = guest.check_output("tr '\\0' '\\n' < /sys/firmware/dmi/tables/DMI")
    assert "vmsh-oem-one\nvmsh-oem-two" in table


def test_poweroff_ends_the_vmm_with_status_zero(vmsh_guest) -> None:
    guest = vmsh_guest()
    guest.send("poweroff\n")
    assert guest.wait_exit(timeout=120) == 0


def test_reboot_comes_back(vmsh_guest) -> None:
    guest = vmsh_guest()
    guest.send("reboot\n")
    guest.wait_ready()
    assert guest.check_output("echo back") == "back"


def test_serial_file_mode_carries_the_console(vmsh_guest, tmp_path) -> None:
    log = tmp_path / "serial.log"
    guest = vmsh_guest(serial=f"file={log}", ready=False)
    wait_until(lambda: log.exists() and "VMSH-READY" in log.read_text(errors="replace"), 240,
               f"the ready marker in {log}", interval=0.2, process=guest.exit_status)


def test_debian_cloud_kernel_starts_and_keeps_running(vmsh_guest) -> None:
    # The stock kernel needs hundreds of millions of emulated instructions to reach user
    # space on a PVM host; here it must print its banner, find the ACPI tables and go on.
    guest = vmsh_guest(kernel="debian-vmlinux", initramfs="debian-initramfs", ready=False,
                         cmdline="console=ttyS0 earlyprintk=ttyS0 noxsave clearcpuid=smap,popcnt mitigations=off "
                                 "nofsgsbase")
    guest.expect(r"Linux version 6\.1\.\S+-cloud-amd64", timeout=120)
    guest.expect(r"ACPI: RSDP 0x00000000000A0000", timeout=120)
    guest.expect(r"ACPI: Using ACPI \(MADT\) for SMP configuration information", timeout=180)
    assert guest.exit_status() is None


@pytest.mark.parametrize("console", ["serial", "virtio"])
def test_the_guest_s_last_output_reaches_the_console(vmsh_clone, tmp_path, console: str) -> None:
    """What the guest wrote before it powered off is on the console when the VMM has exited, on
    the serial port and on the virtio console (hvc0) alike.

    The kernel's own last line ("reboot: Power down") can only come on the serial port: Linux's
    device_shutdown resets every virtio device first (drivers/virtio/virtio.c
    virtio_dev_shutdown, which breaks its virtqueues), so it never reaches hvc0 under any VMM;
    the event monitor shows that reset of ``__console`` before the VM stops.
    """
    events = tmp_path / "events.json"
    kw = {} if console == "serial" else {"serial": "off", "console": "tty", "cmdline": "console=hvc0 quiet"}
    guest = vmsh_clone(restore_flags=["--event-monitor", f"path={events}"], **kw)
    guest.send("echo LAST-LINE-1; echo LAST-LINE-2; poweroff -f\n")
    assert guest.wait_exit(timeout=120) == 0
    tail = guest.console_tail()
    assert re.search(r"LAST-LINE-1\r?\n+LAST-LINE-2\r?\n", tail), tail  # lines, not the command's echo
    records = events_of(events)
    stop = records.index(("vm", "shutdown", {}))
    if console == "serial":
        assert tail.rstrip().endswith("reboot: Power down"), tail
    else:
        assert ("virtio-device", "reset", {"id": "__console"}) in records[:stop]


def test_full_kernel_flavour_boots_with_its_features(vmsh_guest) -> None:
    """The ``full`` flavour (guest-images/kernel/full.config: memory hotplug, virtio-mem, NUMA,
    virtio-iommu, TPM) on a VM that uses none of them: the same CPUs and memory as the
    default kernel sees, one NUMA node, hot-added memory onlined by default."""
    guest = vmsh_guest("--cpus", "boot=2", "--memory", "size=192M", kernel="vmlinux-full")
    assert guest.check_output("nproc") == "2"
    kib = int(guest.check_output("awk '/MemTotal/ {print $2}' /proc/meminfo"))
    assert 150 * 1024 < kib <= 192 * 1024
    assert guest.check_output("ls -d /sys/devices/system/node/node*").split() == ["/sys/devices/system/node/node0"]
    assert guest.check_output("cat /sys/devices/system/node/node0/cpulist") == "0-1"
    assert guest.check_output("cat /sys/devices/system/memory/auto_online_blocks") == "online"
    # CPU hotplug inside the guest: cpu1 goes offline and comes back
    guest.check_output("echo 0 > /sys/devices/system/cpu/cpu1/online")
    assert guest.check_output("cat /sys/devices/system/cpu/online") == "0"
    guest.check_output("echo 1 > /sys/devices/system/cpu/cpu1/online")
    assert guest.check_output("cat /sys/devices/system/cpu/online") == "0-1"
