"""A TPM 2.0 in a real guest: ``--tpm socket=`` against swtpm (Debian ``swtpm``). Linux's tpm_crb
binds to the DSDT's MSFT0101 device through the ACPI TPM2 table, starts the TPM (TPM2_Startup)
and creates /dev/tpm0; a TPM2_GetRandom written to it from the guest's shell is answered with
fresh bytes; a snapshot of the guest is refused before anything is written.

The guest kernel needs CONFIG_TCG_CRB, which is in the ``kernel-full`` flavour (issue #19); the
test skips (fails in CI) naming that option while that kernel is not built.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.devices.test_tpm import SWTPM, listening, needs_swtpm
from vmsh.api.client import ApiClient, ApiError
from vmsh.harness.requirements import unavailable
from vmsh.harness.waiting import wait_until

#: the kernel flavour with the TPM drivers, and its config
TPM_KERNEL, TPM_KERNEL_CONFIG = "kernel-full", "kernel-full-config"
#: TPM2_GetRandom(16) in octal escapes for the guest's printf: tag 0x8001, size 12, code 0x17b
GET_RANDOM_16 = r"\200\001\000\000\000\014\000\000\001\173\000\020"


@pytest.fixture
def swtpm_socket(tmp_path: Path) -> Iterator[Path]:
    ctrl = tmp_path / "swtpm.sock"
    proc = subprocess.Popen([SWTPM or "swtpm", "socket", "--tpm2", "--ctrl", f"type=unixio,path={ctrl}",
                             "--tpmstate", f"dir={tmp_path}", "--log", f"file={tmp_path / 'swtpm.log'},level=2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(ctrl), 10, "swtpm's control socket to listen", interval=0.02, process=proc)
        yield ctrl
    finally:
        proc.kill()
        proc.wait()


def tpm_kernel(vmsh_image) -> str:
    """The name of the kernel image with CONFIG_TCG_CRB=y, or a loud skip naming the option."""
    try:
        config = Path(vmsh_image(TPM_KERNEL_CONFIG)).read_text()
    except (pytest.skip.Exception, pytest.fail.Exception) as err:  # an unknown or unbuilt image
        unavailable(f"a guest kernel with CONFIG_TCG_CRB=y ({TPM_KERNEL}, issue #19) is not available: {err}")
    if "CONFIG_TCG_CRB=y" not in config.splitlines():
        unavailable(f"the guest kernel {TPM_KERNEL} lacks CONFIG_TCG_CRB=y")
    vmsh_image(TPM_KERNEL)  # built along with its config, else this skips too
    return TPM_KERNEL


@needs_swtpm
def test_guest_talks_to_swtpm(vmsh_guest, vmsh_image, swtpm_socket: Path, tmp_path: Path) -> None:
    kernel = tpm_kernel(vmsh_image)
    api = tmp_path / "api.sock"
    guest = vmsh_guest("--tpm", f"socket={swtpm_socket}", "--api-socket", f"path={api}", kernel=kernel)
    assert guest.check_output("cat /sys/class/tpm/tpm0/tpm_version_major") == "2"
    assert guest.check_output("[ -c /dev/tpm0 ] && echo yes") == "yes"
    assert "MSFT0101" in guest.check_output("cat /sys/class/tpm/tpm0/device/hid 2>/dev/null || "
                                            "readlink /sys/class/tpm/tpm0/device")
    answers = set()
    for _ in range(2):
        # one write() of the whole command, one read() of the whole response, on one descriptor
        out = guest.check_output(f"exec 3<>/dev/tpm0; printf '{GET_RANDOM_16}' >&3; "
                                 "dd bs=4096 count=1 <&3 2>/dev/null | od -An -v -tx1 | tr -d ' \\n'; exec 3>&-")
        # tag 8001, size 28, TPM_RC_SUCCESS, 16 bytes
        assert out[:24] == "80010000001c000000000010", out
        assert len(out) == 2 * 28
        answers.add(out[24:])
    assert len(answers) == 2
    snap = tmp_path / "snap"
    snap.mkdir()
    with ApiClient(str(api)) as client:
        client.put("vm.pause")
        with pytest.raises(ApiError, match=r"Cannot snapshot a VM with a TPM \(--tpm\)"):
            client.put("vm.snapshot", {"destination_url": f"file://{snap}"})
        client.put("vm.resume")
    assert list(snap.iterdir()) == []
    assert guest.check_output("cat /sys/class/tpm/tpm0/tpm_version_major") == "2"
