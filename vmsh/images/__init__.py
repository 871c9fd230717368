"""Guest images for vmsh's tests: the default kernel, the Debian kernel, initramfs, disks.

Every artifact is built from Debian packages into a cache outside the work tree
(``$VMSH_IMAGE_CACHE``, default ``~/.cache/vmsh/images``). The names accepted by
``vmsh images path NAME`` are the keys of :data:`vmsh.images.targets.ARTIFACTS`;
:func:`image_path` is the programmatic form. Nothing heavy is imported here.
"""

from __future__ import annotations

from pathlib import Path


def image_path(name: str) -> Path:
    """Return the path of the built artifact ``name``; raise ImageError if it is not built."""
    from vmsh.images.targets import artifact_path

    return artifact_path(name)
