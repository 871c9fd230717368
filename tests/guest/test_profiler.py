"""The guest profiler on a real Linux guest: ``--profile`` given to a restored clone samples
its vCPU, reads the kernel stack of each sample taken in the kernel, and writes the report
(with its inclusive view) and the folded stacks beside it."""

from __future__ import annotations

from pathlib import Path

from vmsh.images import image_path


def test_profile_shows_the_kernel_call_chains_of_a_guest_workload(vmsh_clone, tmp_path: Path) -> None:
    report = tmp_path / "profile.txt"
    system_map = image_path("system-map")
    guest = vmsh_clone(restore_flags=["--profile", f"path={report},hz=500,system_map={system_map}"])
    # kernel work from system calls: reads of /dev/zero clear user memory in the kernel
    guest.check_output("dd if=/dev/zero of=/dev/null bs=64k count=3000 2>/dev/null", timeout=120)
    guest.send("poweroff\n")
    assert guest.wait_exit(timeout=120) == 0

    text = report.read_text()
    assert text.split()[1] == "samples" and int(text.split()[0]) > 20, text[:500]
    assert "\ninclusive (" in text, text
    inclusive = text.split("\ninclusive (", 1)[1].split("\n\n", 1)[0]
    # the system-call entry is on the stack of the samples taken in read_zero's work
    assert "do_syscall_64" in inclusive, inclusive
    folded = (tmp_path / "profile.txt.folded").read_text().splitlines()
    assert folded and all(line.rsplit(" ", 1)[1].isdigit() for line in folded)
    chains = [line.rsplit(" ", 1)[0].split(";") for line in folded]
    # a chain runs from the outermost caller to the sampled function: do_syscall_64 calls read_zero
    assert any("do_syscall_64" in c and "read_zero" in c and c.index("do_syscall_64") < c.index("read_zero")
               for c in chains), folded[:20]
