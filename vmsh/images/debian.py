"""The Debian cloud kernel: ``linux-image-*-cloud-amd64`` as shipped, plus its PVH vmlinux.

The package that Debian 12's ``linux-image-cloud-amd64`` metapackage currently
depends on is fetched with ``apt-get download`` (never installed on the host) and
unpacked with ``dpkg-deb -x``. ``vmlinuz`` is kept as shipped; ``vmlinux`` is its
decompressed payload (an ELF with the PVH note); the virtio modules and their
dependencies are copied out for ``debian-initramfs``.
"""

from __future__ import annotations

import functools
import logging
import lzma
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from vmsh.errors import ImageError
from vmsh.images import elf, tools
from vmsh.images.steps import run_logged, step

log = logging.getLogger(__name__)

TARGET = "debian-kernel"
RECIPE = 1
METAPACKAGE = "linux-image-cloud-amd64"
TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "lz4")

#: modules the guest tests need, by name; their dependencies are added from .modinfo
WANTED_MODULES = (
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng",
    "virtio_balloon", "vmw_vsock_virtio_transport", "virtio_pmem", "nd_pmem",
    "pvpanic_pci", "button",
)


def _apt_show(package: str) -> str:
    try:
        out = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                             capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise ImageError("apt-cache not found: this needs a Debian host") from err
    if out.returncode != 0 or not out.stdout.strip():
        raise ImageError(f"apt knows no package {package}: run apt-get update")
    return out.stdout


@functools.cache
def current_package() -> tuple[str, str]:
    """Return (package, version) of the cloud kernel the metapackage points at.

    The metapackage pins its kernel with ``(= version)``, so one apt-cache call
    (about a second) gives both; cached per process since every key needs it.
    """
    depends = re.search(r"^Depends: (.*)$", _apt_show(METAPACKAGE), re.MULTILINE)
    image = re.search(r"(linux-image-[\w.+-]+-cloud-amd64) \(= ([^)\s]+)\)",
                      depends[1] if depends else "")
    if not image:
        raise ImageError(f"cannot find the kernel package {METAPACKAGE} depends on")
    return image[1], image[2]


def key_inputs() -> dict[str, str]:
    """The package name and version: a new Debian kernel upload gives a new key."""
    package, version = current_package()
    return {"recipe": str(RECIPE), "package": package, "version": version}


def build(out: Path, logfile: Path) -> dict[str, object]:
    """Download and unpack the cloud kernel into ``out``; return facts for the manifest."""
    tools.require_tools(TOOLS)
    package, version = current_package()
    work = out / "work"
    work.mkdir()
    with step(TARGET, f"downloading {package} {version}"):
        run_logged(["apt-get", "download", "-q", f"{package}={version}"], logfile, cwd=work,
                   what="apt-get download")
    debs = list(work.glob("*.deb"))
    if len(debs) != 1:
        raise ImageError(f"apt-get download left {len(debs)} .deb files, log: {logfile}")
    root = work / "root"
    with step(TARGET, "unpacking"):
        run_logged(["dpkg-deb", "-x", str(debs[0]), str(root)], logfile, what="dpkg-deb")
    vmlinuz = _one(root.glob("boot/vmlinuz-*"), "boot/vmlinuz-*")
    release = vmlinuz.name.removeprefix("vmlinuz-")
    shutil.copy2(vmlinuz, out / "vmlinuz")
    shutil.copy2(root / "boot" / f"config-{release}", out / "config")
    with step(TARGET, "extracting vmlinux from vmlinuz"):
        (out / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
    entry = elf.pvh_entry(out / "vmlinux")
    if entry is None:
        raise ImageError("Debian vmlinux has no PVH note (XEN_ELFNOTE_PHYS32_ENTRY)")
    with step(TARGET, "collecting virtio modules"):
        order = collect_modules(root / "lib" / "modules" / release, out / "modules")
    (out / "modules" / "load-order").write_text("".join(f"{m}\n" for m in order))
    shutil.rmtree(work)
    return {"package": package, "version": version, "release": release,
            "pvh_entry": hex(entry), "modules": order,
            "sizes": {n: (out / n).stat().st_size for n in ("vmlinuz", "vmlinux")}}


def _one(paths, what: str) -> Path:
    found = list(paths)
    if len(found) != 1:
        raise ImageError(f"expected one {what} in the package, found {len(found)}")
    return found[0]


# --- vmlinux from a bzImage ---------------------------------------------------------

#: Documentation/x86/boot.rst: setup header fields used to find the payload
_SETUP_SECTS = 0x1F1
_HDR_MAGIC = 0x202
_PAYLOAD_OFFSET = 0x248
_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the ELF kernel inside a bzImage.

    The boot protocol (2.08+) says where the compressed payload is: it starts
    ``payload_offset`` bytes into the protected-mode code and is ``payload_length``
    long, the last four bytes being the uncompressed size that the build appends.
    """
    if bzimage[_HDR_MAGIC : _HDR_MAGIC + 4] != b"HdrS":
        raise ImageError("not a bzImage (no HdrS setup header)")
    setup_sects = bzimage[_SETUP_SECTS] or 4
    pm_start = (setup_sects + 1) * 512
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, _PAYLOAD_OFFSET)
    payload = bzimage[pm_start + payload_offset : pm_start + payload_offset + payload_length]
    stream = payload[:-4]
    if stream.startswith(b"\x1f\x8b"):
        data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(stream)
    elif stream.startswith(b"\xfd7zXZ\x00"):
        data = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(stream)
    elif stream.startswith(_LZ4_LEGACY_MAGIC):
        # the stdlib has no LZ4; the lz4 tool reads the kernel's legacy frame format
        out = subprocess.run(["lz4", "-dc"], input=stream, capture_output=True, check=False)
        data = out.stdout
        if out.returncode != 0 and not data.startswith(b"\x7fELF"):
            raise ImageError(f"lz4 failed: {out.stderr.decode(errors='replace').strip()}")
    else:
        raise ImageError(f"unknown bzImage payload compression (magic {stream[:4].hex()})")
    if not data.startswith(b"\x7fELF"):
        raise ImageError("bzImage payload did not decompress to an ELF file")
    return data


# --- modules ------------------------------------------------------------------------


def _modname(path: Path) -> str:
    """Module names use underscores; files may use dashes (pvpanic-pci.ko)."""
    return path.name.removesuffix(".ko").replace("-", "_")


def collect_modules(moddir: Path, dest: Path, wanted=WANTED_MODULES) -> list[str]:
    """Copy the wanted modules and their dependencies to ``dest``; return the load order.

    Dependencies come from each module's ``.modinfo`` ``depends=``; the order is a
    depth-first topological sort, so every module follows what it needs. Modules that
    are built into this kernel (modules.builtin) are skipped silently.
    """
    files = {_modname(p): p for p in moddir.rglob("*.ko")}
    builtin = set()
    if (moddir / "modules.builtin").exists():
        builtin = {_modname(Path(line.strip())) for line in (moddir / "modules.builtin").read_text().splitlines()}
    dest.mkdir(parents=True, exist_ok=True)
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in builtin:
            return
        if name not in files:
            raise ImageError(f"module {name} is neither in the package nor built in")
        if name in visiting:
            raise ImageError(f"module dependency cycle at {name}")
        visiting.add(name)
        deps = elf.modinfo(files[name]).get("depends", [""])[0]
        for dep in filter(None, deps.split(",")):
            visit(dep.replace("-", "_"))
        visiting.discard(name)
        order.append(name)
        shutil.copy2(files[name], dest / f"{name}.ko")

    for name in wanted:
        visit(name)
    return order
