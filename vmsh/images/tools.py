"""Host prerequisites: the tools and Debian packages a build needs, and their versions.

A missing tool is reported with the Debian package that provides it, so the fix
is one ``apt-get install`` away; package versions feed the cache keys.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterable

from vmsh.errors import ImageError

log = logging.getLogger(__name__)

#: executable -> Debian package that ships it
TOOL_PACKAGES: dict[str, str] = {
    "make": "make",
    "gcc": "gcc",
    "ld": "binutils",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "perl": "perl",
    "tar": "tar",
    "xz": "xz-utils",
    "lz4": "lz4",
    "patch": "patch",
    "mkfs.ext4": "e2fsprogs",
    "dpkg-deb": "dpkg",
    "dpkg-query": "dpkg",
    "apt-get": "apt",
    "apt-cache": "apt",
    "qemu-system-x86_64": "qemu-system-x86",
}

#: header file -> Debian package (the kernel's objtool links against libelf)
HEADER_PACKAGES: dict[str, str] = {
    "/usr/include/gelf.h": "libelf-dev",
}


def require_tools(tools: Iterable[str], headers: Iterable[str] = ()) -> None:
    """Raise ImageError naming the packages to install if any tool or header is missing."""
    from pathlib import Path

    missing: dict[str, str] = {}
    for tool in tools:
        if shutil.which(tool) is None:
            missing[tool] = TOOL_PACKAGES.get(tool, tool)
    for header in headers:
        if not Path(header).exists():
            missing[header] = HEADER_PACKAGES[header]
    if missing:
        pkgs = " ".join(sorted(set(missing.values())))
        raise ImageError(f"missing {', '.join(sorted(missing))}: apt-get install {pkgs}")


def package_version(package: str) -> str:
    """Return the installed version of a Debian package, or raise ImageError."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
            capture_output=True, text=True, check=False,
        )
    except FileNotFoundError as err:
        raise ImageError("dpkg-query not found: this needs a Debian host") from err
    status, _, version = out.stdout.partition("\t")
    if out.returncode != 0 or "installed" not in status.split() or not version:
        raise ImageError(f"package {package} is not installed: apt-get install {package}")
    return version


def require_packages(packages: Iterable[str]) -> dict[str, str]:
    """Return ``{package: version}``; raise one ImageError naming every missing package."""
    versions: dict[str, str] = {}
    missing: list[str] = []
    for pkg in packages:
        try:
            versions[pkg] = package_version(pkg)
        except ImageError:
            missing.append(pkg)
    if missing:
        raise ImageError(f"packages not installed: apt-get install {' '.join(missing)}")
    return versions


def optional_tool(tool: str) -> str | None:
    """Path of an optional tool (ccache), or None."""
    return shutil.which(tool)
