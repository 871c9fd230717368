"""The static guest helpers (``guest-images/tools/``): how they are built, and /bin/vsock in
the built initramfs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmsh.errors import ImageError
from vmsh.images import cpio, guest_tools, initramfs


def _readelf(path) -> str:
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) not installed")
    return subprocess.run(["readelf", "-lhW", str(path)], capture_output=True, text=True, check=True).stdout


#: musl's static vsock is about 34 KB, glibc's 0.67 MB: the guest kernel unpacks every byte
MAX_TOOL_BYTES = 128 << 10


def _check_static_and_runs(path) -> None:
    """Checked with binutils and by running it, not with the builder's own ELF reader."""
    data = path.read_bytes()
    # linked with musl: glibc's static code carries its GLIBC_* version strings
    assert b"GLIBC" not in data and len(data) < MAX_TOOL_BYTES, len(data)
    headers = _readelf(path)
    assert "EXEC (Executable file)" in headers and "X86-64" in headers
    assert "INTERP" not in headers and "DYNAMIC" not in headers, headers
    # without arguments it prints its usage and exits 2 (it has no loader to miss)
    run = subprocess.run([str(path)], capture_output=True, text=True, env={}, check=False)
    assert run.returncode == 2 and run.stderr.startswith("usage: vsock listen PORT"), run


@pytest.mark.images
@pytest.mark.parametrize("name", ["initramfs", "debian-initramfs"])
def test_initramfs_has_a_static_vsock_tool(image, tmp_path, name):
    members = cpio.read_names(image(name).read_bytes())
    mode, data = members["bin/vsock"]
    assert mode == 0o100755
    exe = tmp_path / "vsock"
    exe.write_bytes(data)
    exe.chmod(0o755)
    _check_static_and_runs(exe)


def test_build_compiles_static_programs(tmp_path):
    try:
        guest_tools.key_inputs()
    except ImageError as err:
        pytest.skip(str(err))
    built = guest_tools.build(tmp_path / "log")
    # reproducible: the initramfs is keyed by its inputs and must not change between builds
    assert guest_tools.build(tmp_path / "log2") == built
    assert set(built) == set(guest_tools.PROGRAMS) == {"bin/vsock"}
    exe = tmp_path / "vsock"
    exe.write_bytes(built["bin/vsock"])
    exe.chmod(0o755)
    _check_static_and_runs(exe)
    assert guest_tools.is_static_executable(built["bin/vsock"])
    # a dynamically linked program (the Python running this test) is told apart
    assert not guest_tools.is_static_executable(Path(os.path.realpath(sys.executable)).read_bytes())
    assert not guest_tools.is_static_executable(b"#!/bin/sh\n")


def test_missing_musl_gcc_names_the_package(tmp_path, monkeypatch):
    # gcc is there, musl-gcc is not (a PATH holding only a stand-in gcc)
    fake = tmp_path / "gcc"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImageError, match="musl-gcc is missing.*apt-get install musl-tools"):
        guest_tools.build(tmp_path / "log")


def test_tool_sources_are_in_the_initramfs_key(monkeypatch, tmp_path):
    try:
        before = initramfs.key_inputs()
    except ImageError as err:
        pytest.skip(str(err))
    source = tmp_path / "vsock.c"
    source.write_text("int main(void) { return 0; }\n")
    monkeypatch.setattr(guest_tools, "TOOLS_DIR", tmp_path)
    after = initramfs.key_inputs()
    assert after["tool:bin/vsock"] != before["tool:bin/vsock"]
    assert {k: v for k, v in after.items() if k != "tool:bin/vsock"} == {
        k: v for k, v in before.items() if k != "tool:bin/vsock"}
