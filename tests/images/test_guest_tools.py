"""The static guest helpers (``guest-images/tools/``): how they are built, and /bin/vsock and
/bin/randread and /bin/tpmrand in the built initramfs."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vmsh.errors import ImageError
from vmsh.harness.requirements import unavailable
from vmsh.images import cpio, guest_tools, initramfs


def _readelf(path) -> str:
    if shutil.which("readelf") is None:
        unavailable("readelf (binutils) not installed")
    return subprocess.run(["readelf", "-lhW", str(path)], capture_output=True, text=True, check=True).stdout


#: musl's static vsock is about 34 KB, glibc's 0.67 MB: the guest kernel unpacks every byte
MAX_TOOL_BYTES = 128 << 10


#: what each program prints on stderr when run without arguments (it then exits 2)
USAGE = {"bin/vsock": "usage: vsock listen PORT", "bin/randread": "usage: randread [-s] [-w] [-n COUNT]",
         "bin/tpmrand": "usage: tpmrand [-n BYTES] DEVICE"}


def _check_static_and_runs(path, usage: str) -> None:
    """Checked with binutils and by running it, not with the builder's own ELF reader."""
    data = path.read_bytes()
    # linked with musl: glibc's static code carries its GLIBC_* version strings
    assert b"GLIBC" not in data and len(data) < MAX_TOOL_BYTES, len(data)
    headers = _readelf(path)
    assert "EXEC (Executable file)" in headers and "X86-64" in headers
    assert "INTERP" not in headers and "DYNAMIC" not in headers, headers
    # without arguments it prints its usage and exits 2 (it has no loader to miss)
    run = subprocess.run([str(path)], capture_output=True, text=True, env={}, check=False)
    assert run.returncode == 2 and run.stderr.startswith(usage), run


@pytest.mark.images
@pytest.mark.parametrize("name", ["initramfs", "debian-initramfs"])
def test_initramfs_has_the_static_tools(image, tmp_path, name):
    members = cpio.read_names(image(name).read_bytes())
    for dest in guest_tools.PROGRAMS:
        mode, data = members[dest]
        assert mode == 0o100755
        exe = tmp_path / Path(dest).name
        exe.write_bytes(data)
        exe.chmod(0o755)
        _check_static_and_runs(exe, USAGE[dest])


def test_build_compiles_static_programs(tmp_path):
    try:
        guest_tools.key_inputs()
    except ImageError as err:
        pytest.skip(str(err))
    built = guest_tools.build(tmp_path / "log")
    # reproducible: the initramfs is keyed by its inputs and must not change between builds
    assert guest_tools.build(tmp_path / "log2") == built
    assert set(built) == set(guest_tools.PROGRAMS) == set(USAGE)
    for dest, data in built.items():
        exe = tmp_path / Path(dest).name
        exe.write_bytes(data)
        exe.chmod(0o755)
        _check_static_and_runs(exe, USAGE[dest])
        assert guest_tools.is_static_executable(data)
    # a dynamically linked program (the Python running this test) is told apart
    assert not guest_tools.is_static_executable(Path(os.path.realpath(sys.executable)).read_bytes())
    assert not guest_tools.is_static_executable(b"#!/bin/sh\n")


def test_missing_musl_gcc_names_the_package(tmp_path, monkeypatch):
    # gcc is there, musl-gcc is not (a PATH holding only a stand-in gcc)
    fake = tmp_path / "gcc"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImageError, match=r"musl-gcc is missing.*apt-get install musl-tools"):
        guest_tools.build(tmp_path / "log")


def test_tool_sources_are_in_the_initramfs_key(monkeypatch, tmp_path):
    try:
        before = initramfs.key_inputs()
    except ImageError as err:
        pytest.skip(str(err))
    for source in guest_tools.PROGRAMS.values():
        (tmp_path / source).write_bytes((guest_tools.TOOLS_DIR / source).read_bytes())
    (tmp_path / "vsock.c").write_text("int main(void) { return 0; }\n")
    monkeypatch.setattr(guest_tools, "TOOLS_DIR", tmp_path)
    after = initramfs.key_inputs()
    assert after["tool:bin/vsock"] != before["tool:bin/vsock"]
    assert {k: v for k, v in after.items() if k != "tool:bin/vsock"} == {
        k: v for k, v in before.items() if k != "tool:bin/vsock"}


def test_randread_reads_and_writes_with_o_direct(tmp_path):
    try:
        guest_tools.key_inputs()
    except ImageError as err:
        pytest.skip(str(err))
    exe = tmp_path / "randread"
    exe.write_bytes(guest_tools.build(tmp_path / "log")["bin/randread"])
    exe.chmod(0o755)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(8 << 20))

    def randread(*args: str) -> str:
        run = subprocess.run([str(exe), *args, str(disk)], capture_output=True, text=True, check=False)
        if run.returncode == 1 and "Invalid argument" in run.stderr:
            pytest.skip(f"no O_DIRECT on the file system of {tmp_path}")
        assert run.returncode == 0, run
        return run.stdout

    # sequential writes of 1 MiB: the first 3 MiB hold the pattern, the rest is untouched
    assert randread("-s", "-w", "-b", "1048576", "-n", "3").startswith("randread: 3 writes of 1048576 bytes in ")
    data = disk.read_bytes()
    assert data[: 3 << 20] == b"\xa5" * (3 << 20) and data[3 << 20:] == bytes(5 << 20)
    out = randread("-n", "100")
    assert out.startswith("randread: 100 reads of 4096 bytes in ") and out.rstrip().endswith("MiB/s"), out
    # a time limit alone ends the run too
    assert randread("-t", "1").startswith("randread: ")
    bad = subprocess.run([str(exe), "-b", "1000", str(disk)], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith(USAGE["bin/randread"])


def _tpm_response(code: int, digest: bytes | None) -> bytes:
    """A TPM2_GetRandom response: header (tag, size, response code), then the TPM2B digest."""
    body = b"" if digest is None else struct.pack(">H", len(digest)) + digest
    return struct.pack(">HII", 0x8001, 10 + len(body), code) + body


def test_tpmrand_sends_get_random_and_prints_the_answer(tmp_path):
    """A regular file stands in for /dev/tpm0: tpmrand writes its 12-byte command at offset 0
    and reads the response that follows it, so the command it sent and how it parses the
    answer can both be checked without a TPM."""
    try:
        guest_tools.key_inputs()
    except ImageError as err:
        pytest.skip(str(err))
    exe = tmp_path / "tpmrand"
    exe.write_bytes(guest_tools.build(tmp_path / "log")["bin/tpmrand"])
    exe.chmod(0o755)
    dev = tmp_path / "tpm0"

    def tpmrand(response: bytes, *args: str) -> subprocess.CompletedProcess[str]:
        dev.write_bytes(bytes(12) + response)
        return subprocess.run([str(exe), *args, str(dev)], capture_output=True, text=True, check=False)

    digest = bytes(range(0xf0, 0xf5))
    run = tpmrand(_tpm_response(0, digest), "-n", "5")
    assert (run.returncode, run.stdout, run.stderr) == (0, "f0f1f2f3f4\n", "")
    # TPM_ST_NO_SESSIONS, 12 bytes, TPM_CC_GetRandom, bytesRequested 5
    assert dev.read_bytes()[:12] == struct.pack(">HIIH", 0x8001, 12, 0x17B, 5)
    run = tpmrand(_tpm_response(0x101, None))
    assert run.returncode == 1 and run.stderr == "tpmrand: TPM response code 0x00000101\n", run
    # more bytes than were asked for is a broken TPM, not data
    run = tpmrand(_tpm_response(0, bytes(20)), "-n", "4")
    assert run.returncode == 1 and "more than asked" in run.stderr, run
    run = tpmrand(b"")  # nothing after the command: the "device" gave no response
    assert run.returncode == 1 and "malformed response" in run.stderr, run
    for bad in (["-n", "0"], ["-n", "1025"], ["-n", "x"], ["-x"], ["-n", "4"], [str(dev), str(dev)]):
        run = subprocess.run([str(exe), *bad], capture_output=True, text=True, check=False)
        assert run.returncode == 2 and run.stderr.startswith(USAGE["bin/tpmrand"]), (bad, run)
    run = subprocess.run([str(exe), str(tmp_path / "missing")], capture_output=True, text=True, check=False)
    assert run.returncode == 1 and "No such file" in run.stderr, run
