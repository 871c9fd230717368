"""The initramfs images: busybox-static, ``guest-images/init.sh`` as ``/init``, and the
static helpers of ``guest-images/tools/`` (``/bin/vsock``; see ``guest_tools``).

``initramfs`` has no modules (the default kernel has everything built in);
``debian-initramfs`` is the same plus the Debian kernel's virtio modules under
``/lib/modules/<release>/`` with a ``load-order`` file that ``/init`` follows when
``uname -r`` matches. Both are uncompressed cpio: unpacking costs the guest kernel
a copy, where gzip would cost it tens of millions of emulated instructions.
"""

from __future__ import annotations

import io
import logging
import subprocess
from pathlib import Path

from vmsh.errors import ImageError
from vmsh.images import cache, cpio, guest_tools, tools

log = logging.getLogger(__name__)

TARGET = "initramfs"
DEBIAN_TARGET = "debian-initramfs"
#: 2: applet links only for LINKED_APPLETS, a static /etc/fstab; 3: /bin/vsock
RECIPE = 3
BUSYBOX = Path("/bin/busybox")
BUSYBOX_PACKAGE = "busybox-static"
INIT_SCRIPT = cache.GUEST_IMAGES_DIR / "init.sh"
FILENAME = "initramfs.cpio"
#: marker line /init prints once the guest is usable
READY_MARKER = "VMSH-READY"

#: The only applet links in the image. Unpacking a link costs the guest kernel about
#: 14,000 emulated instructions (header parsing, path walk, inode), and the shell runs
#: every applet by name without one (busybox-static is built with
#: FEATURE_SH_STANDALONE and FEATURE_PREFER_APPLETS: applets that exec others, such as
#: setsid, env or xargs, find applets the same way) by re-executing /proc/self/exe.
#: Before /proc is mounted that fails and the shell falls back to PATH, so /bin/mount
#: must exist for the Debian kernel's /init; /bin/sh is the interpreter of ``#!/bin/sh``
#: scripts; the others are the applets /init and its traps run, kept reachable by path.
LINKED_APPLETS = ("bin/sh", "bin/mount", "sbin/insmod", "sbin/poweroff", "usr/bin/setsid", "bin/cttyhack")
#: /init mounts these with one ``mount -a`` (devtmpfs is mounted before it)
FSTAB = (
    "proc /proc proc defaults 0 0\n"
    "sysfs /sys sysfs defaults 0 0\n"
    "devpts /dev/pts devpts gid=5,mode=620,ptmxmode=666 0 0\n"
    "tmpfs /tmp tmpfs mode=1777 0 0\n"
    "tmpfs /run tmpfs mode=755 0 0\n"
)

_DIRS = ("bin", "dev", "etc", "lib", "lib/modules", "mnt", "proc", "root", "run", "sbin",
         "sys", "tmp", "usr", "usr/bin", "usr/sbin", "var")


def key_inputs() -> dict[str, str]:
    """busybox-static's version, /init, the guest tools' sources and compiler, the archive
    writer (its layout is part of the image), the recipe."""
    inputs = {f"pkg:{p}": v for p, v in tools.require_packages([BUSYBOX_PACKAGE]).items()}
    inputs.update(guest_tools.key_inputs())
    inputs["init"] = cache.file_digest(INIT_SCRIPT)
    inputs["cpio"] = cache.file_digest(Path(cpio.__file__))
    inputs["recipe"] = str(RECIPE)
    return inputs


def _busybox_applets() -> list[str]:
    """Applet paths (``bin/sh``, ``usr/bin/env`` ...) as busybox itself lists them."""
    if not BUSYBOX.exists():
        raise ImageError(f"{BUSYBOX} missing: apt-get install {BUSYBOX_PACKAGE}")
    out = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ImageError("busybox --list-full failed")
    return sorted(line.strip() for line in out.stdout.splitlines() if line.strip())


def _check_standalone_shell() -> None:
    """The image relies on busybox's shell finding applets without links or PATH."""
    out = subprocess.run([str(BUSYBOX), "sh", "-c", "true | cat"], capture_output=True, check=False,
                         env={"PATH": "/nonexistent"})
    if out.returncode != 0:
        raise ImageError(f"{BUSYBOX} sh cannot run applets without links "
                         "(built without FEATURE_SH_STANDALONE?)")


def base_entries(logfile: Path) -> list[cpio.Entry]:
    """The common image: directories, device nodes, busybox and a few applet links, the
    compiled guest tools, /init."""
    entries = [cpio.directory(d) for d in _DIRS]
    entries[_DIRS.index("tmp")] = cpio.directory("tmp", 0o1777)
    # the kernel opens /dev/console for init before anything mounts devtmpfs
    entries += [cpio.chardev("dev/console", 5, 1), cpio.chardev("dev/null", 1, 3, 0o666)]
    entries.append(cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755))
    _check_standalone_shell()
    applets = set(_busybox_applets())
    for applet in LINKED_APPLETS:
        if applet not in applets:
            raise ImageError(f"{BUSYBOX} has no applet {applet}")
        entries.append(cpio.symlink(applet, "/bin/busybox"))
    for path, program in guest_tools.build(logfile).items():
        entries.append(cpio.file(path, program, 0o755))
    entries.append(cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755))
    entries.append(cpio.file("etc/fstab", FSTAB.encode()))
    entries.append(cpio.file("etc/hostname", b"vmsh-guest\n"))
    entries.append(cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"))
    entries.append(cpio.file("etc/group", b"root:x:0:\ntty:x:5:\n"))
    return entries


def module_entries(release: str, moddir: Path) -> list[cpio.Entry]:
    """``/lib/modules/<release>/`` with the modules and their load order."""
    base = f"lib/modules/{release}"
    entries = [cpio.directory(base)]
    for path in sorted(moddir.iterdir()):
        entries.append(cpio.file(f"{base}/{path.name}", path.read_bytes()))
    return entries


def write_image(dest: Path, entries: list[cpio.Entry]) -> None:
    """Write the archive (uncompressed newc, fixed mtimes)."""
    buf = io.BytesIO()
    cpio.write(buf, entries)
    dest.write_bytes(buf.getvalue())


def build(out: Path, logfile: Path) -> dict[str, object]:
    """Build the module-less initramfs into ``out``."""
    entries = base_entries(logfile)
    write_image(out / FILENAME, entries)
    return {"entries": len(entries), "size": (out / FILENAME).stat().st_size}


def build_debian(out: Path, logfile: Path, debian_dir: Path) -> dict[str, object]:
    """Build the initramfs with the Debian kernel's modules from its built target dir."""
    import json

    info = json.loads((debian_dir / "build-info.json").read_text())
    release = info["release"]
    entries = base_entries(logfile) + module_entries(release, debian_dir / "modules")
    write_image(out / FILENAME, entries)
    return {"entries": len(entries), "release": release, "modules": info["modules"],
            "size": (out / FILENAME).stat().st_size}
