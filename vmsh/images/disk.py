"""Disk images with known content for the block-device tests.

``disk``: an 8 MiB ext4 file system made with ``mkfs.ext4 -d`` (no mount, no root
needed) holding ``hello.txt`` and a 64 KiB ``pattern.bin``, with fixed UUID, hash
seed and timestamps so the image is reproducible. ``raw-disk``: 4 MiB with no file
system, each 512-byte sector starting ``VMSH-SECTOR <n>`` followed by a repeating
byte pattern, so a guest read at any offset can be checked. ``disk-manifest`` is a
JSON file with the expected contents and sha256 sums.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from vmsh.images import tools
from vmsh.images.steps import run_logged, step

log = logging.getLogger(__name__)

TARGET = "disk"
RECIPE = 1
EXT4_NAME = "disk.ext4"
RAW_NAME = "pattern.raw"
MANIFEST_NAME = "manifest.json"
EXT4_SIZE = 8 * 1024 * 1024
RAW_SIZE = 4 * 1024 * 1024
SECTOR = 512
HELLO_TEXT = b"hello from the vmsh test disk\n"
FS_UUID = "5e1f0c2a-7d3b-4c55-9a61-766d73680001"
FS_LABEL = "vmsh-test"
#: fixed time for mkfs (E2FSPROGS_FAKE_TIME) and the files, for a reproducible image
FIXED_TIME = 1704067200


def sector_bytes(n: int) -> bytes:
    """Contents of sector ``n`` of the raw image."""
    head = f"VMSH-SECTOR {n:08d}\n".encode()
    body = bytes((n + i) & 0xFF for i in range(SECTOR - len(head)))
    return head + body


def pattern_file() -> bytes:
    """The 64 KiB file inside the ext4 image: bytes 0..255 repeating."""
    return bytes(range(256)) * 256


def key_inputs() -> dict[str, str]:
    inputs = {f"pkg:{p}": v for p, v in tools.require_packages(["e2fsprogs"]).items()}
    inputs["recipe"] = str(RECIPE)
    return inputs


def build(out: Path, logfile: Path) -> dict[str, object]:
    """Write the ext4 image, the raw pattern image and the manifest into ``out``."""
    import os

    tools.require_tools(["mkfs.ext4"])
    content = out / "content"
    content.mkdir()
    files = {"hello.txt": HELLO_TEXT, "pattern.bin": pattern_file()}
    for name, data in files.items():
        (content / name).write_bytes(data)
        os.utime(content / name, (FIXED_TIME, FIXED_TIME))
    os.utime(content, (FIXED_TIME, FIXED_TIME))
    with step(TARGET, "mkfs.ext4"):
        with open(out / EXT4_NAME, "wb") as fh:
            fh.truncate(EXT4_SIZE)
        run_logged(
            ["mkfs.ext4", "-q", "-F", "-d", str(content), "-L", FS_LABEL, "-U", FS_UUID,
             "-E", f"hash_seed={FS_UUID},root_owner=0:0", "-b", "4096", "-I", "256",
             "-O", "^has_journal", str(out / EXT4_NAME)],
            logfile, env={"E2FSPROGS_FAKE_TIME": str(FIXED_TIME)}, what="mkfs.ext4")
    shutil.rmtree(content)
    with open(out / RAW_NAME, "wb") as fh:
        fh.writelines(sector_bytes(n) for n in range(RAW_SIZE // SECTOR))
    manifest = {
        "ext4": {"label": FS_LABEL, "uuid": FS_UUID, "size": EXT4_SIZE,
                 "files": {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                  **({"text": data.decode()} if name == "hello.txt" else {})}
                           for name, data in files.items()}},
        "raw": {"size": RAW_SIZE, "sector_size": SECTOR,
                "sector_format": "VMSH-SECTOR %08d\\n then (n + i) & 0xff",
                "sha256": hashlib.sha256((out / RAW_NAME).read_bytes()).hexdigest()},
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return {"sizes": {EXT4_NAME: EXT4_SIZE, RAW_NAME: RAW_SIZE}}
