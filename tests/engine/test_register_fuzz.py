"""A short run of the register fuzzer ``ci/fuzz/fuzz_registers.py`` (the long runs are by hand,
figures in ci/fuzz/README.md): a real ``vmsh launch`` of a fully populated machine whose guest
writes and reads random values at every port, PCI configuration space, BAR, MSI-X table and
virtio register; no crash, no hang, and proof that the accesses reached the devices."""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path

from ci.fuzz import fuzz_registers as fr


def _details(report: fr.Report) -> str:
    return report.summary() + "\n" + "\n".join(report.findings)


def test_register_fuzz_smoke() -> None:
    """20,000 accesses: the VMM survives them all and its devices saw them."""
    report = fr.run(20_000, seed=1, chunk=500, time_limit=20, tap=fr.default_tap())
    assert report.ok, _details(report)
    assert report.accesses >= 20_000, _details(report)
    # every kind of target was aimed at (the reset kind is rare by design)
    assert set(report.classes) >= {"port", "cf8", "ecam", "bar", "virtio-activate", "bar-move", "platform-mmio",
                                   "random-mmio", "random-port"}, report.classes
    # the guest got through to the devices: garbage activations put virtio devices into their
    # error state (the transport's NEEDS_RESET or the device's own); BARs answered where the
    # device tree puts them; reset and driven properly, the rng and the disks served a request
    # and interrupted the guest
    assert report.needs_reset > 0, _details(report)
    assert report.decode_checks > 50 and report.recoveries >= 3, _details(report)
    assert report.peak_rss_mib < 300, _details(report)


def test_a_vmm_that_dies_is_a_crash() -> None:
    """The campaign's crash detection works: a VMM killed in the middle of a chunk is counted as
    a crash with the access in flight, and a fresh VMM carries on."""
    killed: list[int] = []
    original = fr.Campaign.run_chunk

    def run_chunk(self: fr.Campaign, vmm: fr.VmmProcess, accesses: list[fr.Access],
                  count: bool = True) -> list[int] | None:
        if count and self.report.chunks == 2 and not killed:
            killed.append(vmm.proc.pid)
            vmm.proc.send_signal(signal.SIGKILL)
        return original(self, vmm, accesses, count)

    with tempfile.TemporaryDirectory(prefix="vmsh-regfuzz-test-") as tmp:
        campaign = fr.Campaign(2, 200, 20, Path(tmp), None)
        campaign.run_chunk = run_chunk.__get__(campaign)  # type: ignore[method-assign]  # the test's hook
        report = campaign.run(1000)
    assert killed
    assert report.crashes == 1 and not report.ok, _details(report)
    assert "the VMM exited with status -9" in report.findings[0], report.findings
    assert report.vmm_lives == 2 and report.accesses >= 1000, _details(report)
