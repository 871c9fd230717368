"""Small static C programs for the guest, compiled when the initramfs is built.

busybox has no tool for some things the guest tests and benchmarks need (an AF_VSOCK
stream on stdin/stdout, O_DIRECT random reads), so ``guest-images/tools/*.c`` are
compiled here with ``musl-gcc -static`` (Debian's musl-tools) and put into the initramfs.
Static, because the initramfs has no dynamic loader or shared libraries: copying them in
would cost the guest kernel an unpack step per file. musl rather than glibc, because the
guest kernel copies every byte of the initramfs at every boot, emulated on PVM hosts: a
static glibc program is about 0.67 MB (0.4 M emulated instructions of unpacking), the
same program with musl about 34 KB.

musl-gcc searches only musl's own headers, not /usr/include: kernel headers
(``<linux/...>``) are out of reach, so the tools define the few kernel ABI constants
they use themselves.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path

from vmsh.errors import ImageError
from vmsh.images import cache, tools
from vmsh.images.steps import run_logged

TOOLS_DIR = cache.GUEST_IMAGES_DIR / "tools"
#: path in the initramfs -> C source in guest-images/tools/
PROGRAMS = {"bin/vsock": "vsock.c", "bin/randread": "randread.c", "bin/tpmrand": "tpmrand.c"}
#: musl-gcc (musl-tools, which brings musl-dev's libc.a) wraps the system gcc
PACKAGES = ("gcc-12", "musl-tools")
COMPILER = "musl-gcc"
#: -s: symbols only cost unpacking time in the guest
CFLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra")

_PT_INTERP = 3
_PT_DYNAMIC = 2
_ET_EXEC = 2
_EM_X86_64 = 62


def key_inputs() -> dict[str, str]:
    """Package versions, compiler flags and the sources; ImageError if a package is missing."""
    inputs = {f"pkg:{p}": v for p, v in tools.require_packages(PACKAGES).items()}
    inputs["cflags"] = " ".join((COMPILER, *CFLAGS))
    for dest, source in sorted(PROGRAMS.items()):
        inputs[f"tool:{dest}"] = cache.file_digest(TOOLS_DIR / source)
    return inputs


def _require_compiler() -> None:
    """musl-gcc is a shell script around gcc: both must be there."""
    tools.require_tools(["gcc"])
    if shutil.which(COMPILER) is None:
        raise ImageError(f"{COMPILER} is missing (the guest tools are linked statically with musl): "
                         "apt-get install musl-tools")


def is_static_executable(data: bytes) -> bool:
    """An x86-64 ELF executable without a program interpreter or dynamic section."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    if e_type != _ET_EXEC or e_machine != _EM_X86_64 or phoff + phnum * phentsize > len(data):
        return False
    types = {struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)}
    return not types & {_PT_INTERP, _PT_DYNAMIC}


def build(logfile: Path) -> dict[str, bytes]:
    """Compile every program; return ``{path in the initramfs: executable}``."""
    _require_compiler()
    built: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="vmsh-guest-tools-") as tmp:
        for dest, source in sorted(PROGRAMS.items()):
            exe = Path(tmp) / Path(dest).name
            run_logged([COMPILER, *CFLAGS, "-o", str(exe), str(TOOLS_DIR / source)], logfile,
                       what=f"{COMPILER} {source}")
            data = exe.read_bytes()
            if not is_static_executable(data):
                raise ImageError(f"{COMPILER} -static made {source} into something other than a static "
                                 f"x86-64 executable, log: {logfile}")
            built[dest] = data
    return built
