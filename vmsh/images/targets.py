"""The build targets, the artifact names users ask for, and the build driver.

A *target* is one unit of building with one cache directory (``kernel`` makes
``bzImage``, ``vmlinux``, ``System.map`` and ``config`` together); an *artifact*
is one file of a target, named for ``vmsh images path NAME``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from vmsh.errors import ImageError
from vmsh.images import cache, debian, disk, initramfs, kernel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A build unit: its inputs (for the key), its builder and the targets it needs."""

    name: str
    inputs: Callable[[], dict[str, str]]
    build: Callable[[Path, Path], dict[str, object]]
    needs: tuple[str, ...] = ()


def _debian_initramfs_inputs() -> dict[str, str]:
    return {**{f"initramfs:{k}": v for k, v in initramfs.key_inputs().items()},
            "debian-kernel": key("debian-kernel"),
            "modules": ",".join(debian.WANTED_MODULES)}


def _build_debian_initramfs(out: Path, logfile: Path) -> dict[str, object]:
    return initramfs.build_debian(out, logfile, built_dir("debian-kernel"))


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(kernel.DEFAULT.target, kernel.key_inputs, kernel.build),
        Target(kernel.FULL.target, partial(kernel.key_inputs, kernel.FULL),
               partial(kernel.build, flavour=kernel.FULL)),
        Target("debian-kernel", debian.key_inputs, debian.build),
        Target("initramfs", initramfs.key_inputs, initramfs.build),
        Target("debian-initramfs", _debian_initramfs_inputs, _build_debian_initramfs,
               needs=("debian-kernel",)),
        Target("disk", disk.key_inputs, disk.build),
    )
}

#: artifact name -> (target, file name in the target's directory)
ARTIFACTS: dict[str, tuple[str, str]] = {
    "kernel": ("kernel", "bzImage"),
    "vmlinux": ("kernel", "vmlinux"),
    "system-map": ("kernel", "System.map"),
    "kernel-config": ("kernel", "config"),
    "kernel-full": ("kernel-full", "bzImage"),
    "vmlinux-full": ("kernel-full", "vmlinux"),
    "system-map-full": ("kernel-full", "System.map"),
    "kernel-full-config": ("kernel-full", "config"),
    "debian-kernel": ("debian-kernel", "vmlinuz"),
    "debian-vmlinux": ("debian-kernel", "vmlinux"),
    "debian-kernel-config": ("debian-kernel", "config"),
    "initramfs": ("initramfs", initramfs.FILENAME),
    "debian-initramfs": ("debian-initramfs", initramfs.FILENAME),
    "disk": ("disk", disk.EXT4_NAME),
    "raw-disk": ("disk", disk.RAW_NAME),
    "disk-manifest": ("disk", disk.MANIFEST_NAME),
}


def key(target: str) -> str:
    """The cache key of ``target`` from its current inputs."""
    return cache.make_key(TARGETS[target].inputs())


def built_dir(target: str) -> Path:
    """The directory of the built ``target``; ImageError naming the fix if not built."""
    directory = cache.target_dir(target, key(target))
    if not directory.is_dir():
        raise ImageError(f"image {target} is not built: run vmsh images build {target}")
    return directory


def artifact_path(name: str) -> Path:
    """Absolute path of artifact ``name`` (see ARTIFACTS)."""
    if name not in ARTIFACTS:
        raise ImageError(f"unknown image {name!r} (known: {', '.join(ARTIFACTS)})")
    target, filename = ARTIFACTS[name]
    return built_dir(target) / filename


def resolve(names: Iterable[str]) -> list[str]:
    """Targets to build for the given target or artifact names, dependencies first."""
    wanted: list[str] = []
    for name in names:
        if name in TARGETS:
            target = name
        elif name in ARTIFACTS:
            target = ARTIFACTS[name][0]
        else:
            raise ImageError(f"unknown image {name!r} (known: {', '.join(TARGETS)})")
        for dep in (*TARGETS[target].needs, target):
            if dep not in wanted:
                wanted.append(dep)
    return wanted


def build(target_name: str) -> tuple[Path, bool]:
    """Build one target unless its keyed directory exists; return (dir, built_now)."""
    target = TARGETS[target_name]
    inputs = target.inputs()
    k = cache.make_key(inputs)
    final = cache.target_dir(target_name, k)
    if final.is_dir():
        return final, False
    with cache.target_lock(target_name):
        # another process may have finished it while we waited for the lock
        if final.is_dir():
            return final, False
        cache.remove_stale_staging(target_name)
        logfile = cache.log_path(target_name, k)
        logfile.parent.mkdir(parents=True, exist_ok=True)
        logfile.write_text("")
        log.info("%s: building into %s", target_name, final)
        start = time.monotonic()
        with cache.staging_dir(target_name, k) as tmp:
            facts = target.build(tmp, logfile)
            cache.write_manifest(tmp, inputs, build_seconds=round(time.monotonic() - start, 1),
                                 **facts)
        log.info("%s: built in %.1f s", target_name, time.monotonic() - start)
        return final, True


def info(target_name: str) -> dict[str, object] | None:
    """The build-info.json of a built target, or None if not built."""
    try:
        directory = built_dir(target_name)
    except ImageError:
        return None
    return json.loads((directory / "build-info.json").read_text())
