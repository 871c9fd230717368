"""The guest kernels: Debian's linux-source-6.1, tinyconfig plus our fragments.

Steps: extract ``/usr/src/linux-source-6.1.tar.xz``, apply ``guest-images/patches``,
``make tinyconfig``, merge the flavour's fragments (``guest-images/kernel/microvm.config``
for the default kernel; the ``full`` flavour adds ``full.config`` on top), check that
every option the fragments ask for resolved as asked (before compiling, so a bad
fragment fails in seconds, and again after), compile ``bzImage``, and keep
``bzImage``, ``vmlinux`` (checked for the PVH note), ``System.map`` and ``config``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vmsh.errors import ImageError
from vmsh.images import cache, elf, tools
from vmsh.images.steps import run_logged, step

log = logging.getLogger(__name__)

TARGET = "kernel"
#: bumped whenever this recipe changes what it produces
RECIPE = 1
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT = cache.GUEST_IMAGES_DIR / "kernel" / "microvm.config"
#: the second flavour's additions (memory hotplug, virtio-mem, NUMA, virtio-iommu, TPM)
FULL_FRAGMENT = cache.GUEST_IMAGES_DIR / "kernel" / "full.config"
PATCH_DIR = cache.GUEST_IMAGES_DIR / "patches"
TOOLS = ("make", "gcc", "ld", "flex", "bison", "bc", "perl", "tar", "xz", "lz4", "patch")
HEADERS = ("/usr/include/gelf.h",)
PACKAGES = (SOURCE_PACKAGE, "gcc-12", "binutils")
#: fixed build identity, so rebuilding the same inputs gives the same kernel
BUILD_ENV = {
    "KBUILD_BUILD_USER": "vmsh",
    "KBUILD_BUILD_HOST": "vmsh",
    "KBUILD_BUILD_TIMESTAMP": "2024-01-01",
    "KBUILD_BUILD_VERSION": "1",
    "ARCH": "x86_64",
}



@dataclass(frozen=True)
class Flavour:
    """One kernel built from the shared source: its cache target and its fragments, in merge order."""

    target: str
    fragments: tuple[Path, ...]

    def fragment_text(self) -> str:
        """The fragments concatenated; a later line overrides an earlier one for the same option."""
        return "\n".join(f.read_text() for f in self.fragments)

    def fragment_names(self) -> str:
        """The fragments' file names, for messages."""
        return " + ".join(f.name for f in self.fragments)


#: the default kernel, kept cheap to boot
DEFAULT = Flavour("kernel", (FRAGMENT,))
#: the default kernel plus the features that cost boot instructions (see full.config)
FULL = Flavour("kernel-full", (FRAGMENT, FULL_FRAGMENT))

_SET = re.compile(r"^(CONFIG_\w+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")


@dataclass(frozen=True)
class Requirements:
    """What the fragment demands: options with their value, and options left unset."""

    values: dict[str, str]
    unset: frozenset[str]


def fragment_requirements(text: str) -> Requirements:
    """Parse a config fragment into the values it requires and the options it forbids."""
    values: dict[str, str] = {}
    unset: set[str] = set()
    for line in text.splitlines():
        if m := _SET.match(line.strip()):
            values[m[1]] = m[2]
            unset.discard(m[1])
        elif m := _UNSET.match(line.strip()):
            unset.add(m[1])
            values.pop(m[1], None)
    return Requirements(values, frozenset(unset))


def parse_config(text: str) -> dict[str, str]:
    """Parse a kernel ``.config`` into ``{option: value}`` (unset options are absent)."""
    return {m[1]: m[2] for line in text.splitlines() if (m := _SET.match(line.strip()))}


def config_mismatches(config_text: str, fragment_text: str) -> list[str]:
    """Return a description of every option that did not resolve as the fragment asks."""
    req = fragment_requirements(fragment_text)
    got = parse_config(config_text)
    bad = [f"{k}={got.get(k, 'unset')} (want {v})" for k, v in req.values.items() if got.get(k) != v]
    bad += [f"{k}={got[k]} (want unset)" for k in sorted(req.unset) if k in got]
    return bad


def patches() -> list[Path]:
    """The patches applied to the source, in order."""
    return sorted(PATCH_DIR.glob("*.patch"))


def key_inputs(flavour: Flavour = DEFAULT) -> dict[str, str]:
    """Everything the kernel depends on; raises ImageError if a package is missing."""
    inputs = {f"pkg:{p}": v for p, v in tools.require_packages(PACKAGES).items()}
    inputs["recipe"] = str(RECIPE)
    # the first fragment keeps the key name it always had, so the default kernel's key is unchanged
    inputs["fragment"] = cache.file_digest(flavour.fragments[0])
    for extra in flavour.fragments[1:]:
        inputs[f"fragment:{extra.name}"] = cache.file_digest(extra)
    for patch in patches():
        inputs[f"patch:{patch.name}"] = cache.file_digest(patch)
    return inputs


def build(out: Path, logfile: Path, flavour: Flavour = DEFAULT) -> dict[str, object]:
    """Build the kernel ``flavour`` into ``out``; return facts for the manifest."""
    tools.require_tools(TOOLS, HEADERS)
    if not SOURCE_TARBALL.exists():
        raise ImageError(f"{SOURCE_TARBALL} missing: apt-get install {SOURCE_PACKAGE}")
    src = out / "src"
    src.mkdir()
    fragment_text = flavour.fragment_text()
    what = flavour.fragment_names()
    target = flavour.target
    with step(target, f"extracting {SOURCE_TARBALL.name}"):
        run_logged(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(src), "--strip-components=1"],
                   logfile, what="tar")
    with step(target, f"applying {len(patches())} patches"):
        for patch in patches():
            run_logged(["patch", "-p1", "--forward", "--batch", "-i", str(patch)], logfile,
                       cwd=src, what=f"patch {patch.name}")
    env = dict(BUILD_ENV)
    make = ["make", f"-j{os.cpu_count() or 1}"]
    ccache = tools.optional_tool("ccache")
    if ccache:
        make.append("CC=ccache gcc")
        # relative paths in the hash: a rebuild in another temporary directory still hits
        env["CCACHE_BASEDIR"] = str(src)
    with step(target, f"configuring (tinyconfig + {what})"):
        run_logged(["make", "tinyconfig"], logfile, cwd=src, env=env, what="make tinyconfig")
        run_logged(["scripts/kconfig/merge_config.sh", "-m", ".config",
                    *(str(f) for f in flavour.fragments)],
                   logfile, cwd=src, env=env, what="merge_config.sh")
        run_logged(["make", "olddefconfig"], logfile, cwd=src, env=env, what="make olddefconfig")
        _check_config(src / ".config", fragment_text, what, logfile)
    start = time.monotonic()
    with step(target, f"compiling bzImage ({'with' if ccache else 'without'} ccache; log {logfile})"):
        run_logged([*make, "bzImage"], logfile, cwd=src, env=env, heartbeat=60, what="kernel build")
    compile_s = time.monotonic() - start
    _check_config(src / ".config", fragment_text, what, logfile)
    for name, dest in (("arch/x86/boot/bzImage", "bzImage"), ("vmlinux", "vmlinux"),
                       ("System.map", "System.map"), (".config", "config")):
        shutil.copy2(src / name, out / dest)
    entry = elf.pvh_entry(out / "vmlinux")
    if entry is None:
        raise ImageError("built vmlinux has no PVH note (XEN_ELFNOTE_PHYS32_ENTRY)")
    release = (src / "include/config/kernel.release").read_text().strip()
    with step(target, "removing the build tree"):
        shutil.rmtree(src)
    options = parse_config((out / "config").read_text())
    return {
        "release": release,
        "pvh_entry": hex(entry),
        "compile_seconds": round(compile_s, 1),
        "ccache": bool(ccache),
        "options_set": sum(1 for v in options.values() if v != "n"),
        "sizes": {n: (out / n).stat().st_size for n in ("bzImage", "vmlinux")},
    }


def _check_config(config: Path, fragment_text: str, what: str, logfile: Path) -> None:
    """Fail loudly if Kconfig dropped or changed any option the fragment sets."""
    bad = config_mismatches(config.read_text(), fragment_text)
    if bad:
        with open(logfile, "a") as fh:
            fh.write("config mismatches:\n" + "".join(f"  {b}\n" for b in bad))
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ImageError(f"kernel config does not match {what}: {shown}")
