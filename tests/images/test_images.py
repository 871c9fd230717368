"""The built guest images themselves: kernel config, PVH notes, initramfs and disk contents."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from vmsh.images import cpio, elf, initramfs, kernel
from vmsh.images.cache import GUEST_IMAGES_DIR

pytestmark = pytest.mark.images


@pytest.mark.parametrize("name", ["vmlinux", "vmlinux-full", "debian-vmlinux"])
def test_vmlinux_has_pvh_note(image, name):
    entry = elf.pvh_entry(image(name))
    assert entry is not None, f"{name} has no XEN_ELFNOTE_PHYS32_ENTRY note"
    assert 0 < entry < 1 << 32


def test_kernel_config_matches_fragment(image):
    config = image("kernel-config").read_text()
    fragment = kernel.FRAGMENT.read_text()
    assert kernel.config_mismatches(config, fragment) == []
    options = kernel.parse_config(config)
    # the brief's must-haves, spelled out here too so the fragment cannot quietly drop one
    for opt in ("64BIT", "SMP", "PVH", "SERIAL_8250_CONSOLE", "ACPI", "ACPI_TINY_POWER_BUTTON",
                "HOTPLUG_PCI_ACPI", "MAGIC_SYSRQ", "HOTPLUG_CPU", "ACPI_HOTPLUG_CPU",
                "ACPI_PROCESSOR", "PCI_MSI", "VIRTIO_PCI", "VIRTIO_BLK", "VIRTIO_NET",
                "VIRTIO_CONSOLE", "HW_RANDOM_VIRTIO", "VIRTIO_BALLOON", "VIRTIO_PMEM",
                "VIRTIO_VSOCKETS", "FUSE_FS", "VIRTIO_FS", "PVPANIC", "PVPANIC_PCI", "DMI", "DMIID", "RTC_DRV_CMOS",
                "EXT4_FS", "TMPFS", "DEVTMPFS", "DEVTMPFS_MOUNT", "UNIX", "INET",
                "BLK_DEV_INITRD", "CMDLINE_BOOL", "CMDLINE_HIDDEN"):
        assert options.get(f"CONFIG_{opt}") == "y", opt
    for opt in ("MODULES", "FTRACE", "KPROBES", "UNWINDER_ORC", "CPU_MITIGATIONS", "RETPOLINE",
                "RANDOMIZE_BASE", "KALLSYMS", "AUDIT", "SECURITY", "STACKPROTECTOR",
                "JUMP_LABEL", "PARAVIRT_SPINLOCKS", "KERNEL_ZSTD", "DEBUG_INFO_DWARF5",
                "DEBUG_INFO_DWARF4", "PAGE_TABLE_ISOLATION", "FUSE_DAX", "CUSE"):
        assert f"CONFIG_{opt}" not in options, opt
    assert "noxsave" in options["CONFIG_CMDLINE"] and "clearcpuid=" in options["CONFIG_CMDLINE"]
    # without it init dies on its first SYSCALL on PVM hosts (patches/0004)
    assert "syscall_pf_fixup" in options["CONFIG_CMDLINE"]
    for opt in ("PTP_1588_CLOCK", "LEGACY_PTYS", "VT", "IPV6"):  # profiled boot-time costs
        assert f"CONFIG_{opt}" not in options, opt


#: what only the full flavour has (issue 19's guest features), with the options they need
FULL_ONLY = ("MEMORY_HOTPLUG", "MEMORY_HOTREMOVE", "MEMORY_HOTPLUG_DEFAULT_ONLINE",
             "ACPI_HOTPLUG_MEMORY", "VIRTIO_MEM", "NUMA", "ACPI_NUMA", "X86_64_ACPI_NUMA",
             "IOMMU_SUPPORT", "VIRTIO_IOMMU", "ACPI_VIOT", "TCG_TPM", "TCG_CRB")


def test_full_kernel_config_is_default_plus_full_fragment(image):
    config = image("kernel-full-config").read_text()
    assert kernel.config_mismatches(config, kernel.FULL.fragment_text()) == []
    options = kernel.parse_config(config)
    default = kernel.parse_config(image("kernel-config").read_text())
    for opt in FULL_ONLY:
        assert options.get(f"CONFIG_{opt}") == "y", opt
        # they cost the default kernel's boot: guest-images/README.md has the figures
        assert f"CONFIG_{opt}" not in default, opt
    # the features the default kernel has, the full one has too (same base fragment)
    for opt in ("HOTPLUG_CPU", "ACPI_HOTPLUG_CPU", "VIRTIO_PCI", "VIRTIO_BLK", "VIRTIO_FS", "PVH"):
        assert options.get(f"CONFIG_{opt}") == "y", opt
    # no boot-time TPM reads into the entropy pool, and no TIS probe of an address nothing decodes
    for opt in ("HW_RANDOM_TPM", "TCG_TIS", "MODULES", "KALLSYMS", "RETPOLINE"):
        assert f"CONFIG_{opt}" not in options, opt
    assert options["CONFIG_CMDLINE"] == default["CONFIG_CMDLINE"]


def test_later_fragment_line_overrides_earlier():
    req = kernel.fragment_requirements("# CONFIG_A is not set\nCONFIG_B=y\nCONFIG_A=y\n# CONFIG_B is not set\n")
    assert req.values == {"CONFIG_A": "y"}
    assert req.unset == frozenset({"CONFIG_B"})


def test_system_map_next_to_vmlinux(image):
    smap = image("system-map")
    assert smap.parent == image("vmlinux").parent
    assert " T start_kernel\n" in smap.read_text()


def _members(path):
    return cpio.read_names(path.read_bytes())


def test_initramfs_has_busybox_and_init(image):
    members = _members(image("initramfs"))
    assert members["bin/busybox"][1].startswith(b"\x7fELF")
    assert members["init"][1] == (GUEST_IMAGES_DIR / "init.sh").read_bytes()
    assert members["init"][0] & 0o111
    for applet in ("bin/sh", "bin/mount", "sbin/poweroff", "usr/bin/setsid", "bin/cttyhack",
                   "sbin/insmod"):
        assert members[applet][1] == b"/bin/busybox", applet
    # no link per applet: each costs the guest kernel an unpack step (the shell finds
    # applets without links)
    links = [name for name, (mode, _) in members.items() if mode & 0o170000 == 0o120000]
    assert len(links) == len(initramfs.LINKED_APPLETS), links
    assert "etc/fstab" in members
    assert "dev/console" in members
    assert not any(name.startswith("lib/modules/") and name.endswith(".ko") for name in members)


def test_debian_initramfs_has_modules_in_dependency_order(image):
    info = json.loads((image("debian-kernel").parent / "build-info.json").read_text())
    release = info["release"]
    members = _members(image("debian-initramfs"))
    base = f"lib/modules/{release}"
    order = members[f"{base}/load-order"][1].decode().split()
    for mod in ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng",
                "virtio_balloon", "vmw_vsock_virtio_transport", "virtio_pmem"):
        assert mod in order, mod
    for i, mod in enumerate(order):
        blob = members[f"{base}/{mod}.ko"][1]
        deps = elf_depends(blob)
        assert all(order.index(d) < i for d in deps if d in order), (mod, deps)
    assert "bin/busybox" in members and "init" in members


def elf_depends(blob: bytes) -> list[str]:
    section = elf.section(blob, ".modinfo") or b""
    for item in section.split(b"\0"):
        if item.startswith(b"depends="):
            return [d.replace("-", "_") for d in item[8:].decode().split(",") if d]
    return []


def test_disk_has_known_content(image):
    manifest = json.loads(image("disk-manifest").read_text())
    ext4 = image("disk").read_bytes()
    assert ext4[1024 + 56 : 1024 + 58] == b"\x53\xef", "no ext4 superblock magic"
    assert ext4[1024 + 120 : 1024 + 136].rstrip(b"\0").decode() == manifest["ext4"]["label"]
    for name, facts in manifest["ext4"]["files"].items():
        out = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image("disk"))],
                             capture_output=True, check=True)
        assert hashlib.sha256(out.stdout).hexdigest() == facts["sha256"], name
    assert manifest["ext4"]["files"]["hello.txt"]["text"] == "hello from the vmsh test disk\n"


def test_raw_disk_pattern(image):
    from vmsh.images import disk

    raw = image("raw-disk").read_bytes()
    assert len(raw) == disk.RAW_SIZE
    for n in (0, 1, 4095, len(raw) // disk.SECTOR - 1):
        assert raw[n * disk.SECTOR : (n + 1) * disk.SECTOR] == disk.sector_bytes(n)
    assert initramfs.READY_MARKER == "VMSH-READY"
