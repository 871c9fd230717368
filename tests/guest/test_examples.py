"""Every script in ``examples/`` runs as its header says (``vmsh run FILE``) and does what it
claims: exit status 0 (each checks itself with ``assert``) and its closing ``echo``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.vmsh"))

#: what each example prints last; a new example needs its line here
OUTCOMES = {
    "boot-and-check.vmsh": "the guest booted with console=ttyS0 quiet",
    "snapshot-restore.vmsh": "restored from vmsh-example-snapshot",
    "two-disks.vmsh": "two disks: VMSH-SECTOR 00000003",
    "kernel-breakpoint.vmsh": "the guest runs on",
}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path: Path, tmp_path: Path, vmsh_image) -> None:
    vmsh_image("vmlinux")  # fails loudly in CI (skips elsewhere) without KVM or the images
    assert path.name in OUTCOMES, f"{path.name}: add its expected last line to OUTCOMES"
    # from a scratch directory: an example may write there (snapshot-restore's snapshot)
    result = subprocess.run([sys.executable, "-m", "vmsh", "run", str(path)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=900, check=False)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stderr}"
    assert result.stdout.splitlines()[-1] == OUTCOMES[path.name]


def test_every_example_is_run() -> None:
    assert {p.name for p in EXAMPLES} == set(OUTCOMES)
