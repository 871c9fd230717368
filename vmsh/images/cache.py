"""The image cache: where artifacts live, their keys, and atomic publication.

Each build target owns one directory ``<cache>/<target>-<key>`` where ``key`` is a
hash of everything the build depends on (Debian package versions, the contents of
the config and script files in ``guest-images/``, a recipe number). A directory
only appears by ``rename`` of a finished temporary directory, so a crash or Ctrl-C
never leaves a half artifact behind, and an existing directory means "built".
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

#: the repository's guest-images/ directory (config fragment, patches, /init)
GUEST_IMAGES_DIR = Path(__file__).resolve().parents[2] / "guest-images"


def cache_root() -> Path:
    """Return the cache directory: ``$VMSH_IMAGE_CACHE`` or ``~/.cache/vmsh/images``."""
    env = os.environ.get("VMSH_IMAGE_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "vmsh" / "images"


def file_digest(path: Path) -> str:
    """sha256 of a file's contents, hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_key(inputs: Mapping[str, str]) -> str:
    """Hash a flat mapping of build inputs into a short, stable key."""
    blob = json.dumps(dict(sorted(inputs.items())), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def target_dir(target: str, key: str) -> Path:
    """The directory a built target with this key lives in."""
    return cache_root() / f"{target}-{key}"


def log_path(target: str, key: str) -> Path:
    """Build logs live beside, not inside, the artifact: a failed build keeps its log."""
    return cache_root() / "logs" / f"{target}-{key}.log"


@contextlib.contextmanager
def target_lock(target: str) -> Iterator[None]:
    """Serialize builds of one target across processes (pytest-xdist workers, CI jobs)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".lock-{target}", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def staging_dir(target: str, key: str) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``target_dir`` on success.

    The temporary directory sits in the cache root so the final ``rename`` stays on
    one file system and is atomic; on any exception it is removed.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target}-{key}-", dir=root))
    try:
        yield tmp
        final = target_dir(target, key)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; artifacts are for every user
        os.rename(tmp, final)
        log.debug("published %s", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_staging(target: str) -> None:
    """Delete temporary directories a killed build of ``target`` left behind.

    Only call with ``target_lock(target)`` held: staging directories are created
    under that lock, so any that exist then belong to a dead process.
    """
    for stale in cache_root().glob(f".tmp-{target}-*"):
        log.info("%s: removing %s left by an interrupted build", target, stale.name)
        shutil.rmtree(stale, ignore_errors=True)


def write_manifest(directory: Path, inputs: Mapping[str, str], **extra: object) -> None:
    """Record what a target was built from, for humans and for ``vmsh images list``."""
    data = {"inputs": dict(sorted(inputs.items())), **extra}
    (directory / "build-info.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
