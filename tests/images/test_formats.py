"""Image-building helpers on synthetic inputs: no built images, no QEMU needed."""

from __future__ import annotations

import gzip
import io
import struct

import pytest

from vmsh.errors import ImageError
from vmsh.images import cpio, debian, disk, elf, kernel


def test_cpio_round_trip_is_sorted_and_reproducible():
    entries = [cpio.file("init", b"#!/bin/sh\n", 0o755), cpio.directory("bin"),
               cpio.symlink("bin/sh", "/bin/busybox"), cpio.chardev("dev/console", 5, 1),
               cpio.directory("dev")]
    a, b = io.BytesIO(), io.BytesIO()
    cpio.write(a, entries)
    cpio.write(b, list(reversed(entries)))
    assert a.getvalue() == b.getvalue()
    members = cpio.read_names(a.getvalue())
    assert list(members) == ["bin", "bin/sh", "dev", "dev/console", "init"]
    assert members["bin/sh"][1] == b"/bin/busybox"
    assert members["init"] == (0o100755, b"#!/bin/sh\n")
    assert len(a.getvalue()) % 4 == 0


def _page_aligned(archive: bytes, data: bytes) -> bool:
    return archive.index(data) % cpio.PAGE_SIZE == 0


def test_cpio_puts_the_data_of_files_of_a_page_or_more_on_page_boundaries():
    # contents unique to each file, so that where they start can be found
    def content(tag: int, size: int) -> bytes:
        return (bytes([tag]) * 7 + b"\xff") * (size // 8) + bytes([tag]) * (size % 8)

    for name_len in range(1, 60, 7):
        for lead in range(0, 9000, 997):
            entries = [cpio.directory("bin"), cpio.file("bin/a", content(1, lead)),
                       cpio.file("bin/b" + "x" * name_len, content(2, 5000)),
                       cpio.file("bin/c", content(3, 4096)), cpio.file("bin/d", content(4, 4095))]
            out = io.BytesIO()
            cpio.write(out, entries)
            archive = out.getvalue()
            assert _page_aligned(archive, content(2, 5000)) and _page_aligned(archive, content(3, 4096))
            assert cpio.read_names(archive) == {e.path: (e.mode, e.data) for e in entries}
            # a name padded with NULs still ends in one, within the kernel's PATH_MAX
            for name in (b"bin/b" + b"x" * name_len, b"bin/c"):
                header = archive.rindex(b"070701", 0, archive.index(name))
                namesize = int(archive[header + 94 : header + 102], 16)
                assert 0 < namesize <= 4096 and archive[header + 110 + namesize - 1] == 0


def test_cpio_writes_the_parent_directory_again_where_a_padded_name_cannot_align():
    # for each 4-byte step of what comes before, the long name's data is aligned; for
    # some offsets (here 13 of them) the name alone cannot reach the boundary
    data = bytes(range(256)) * 20
    for lead in range(0, 4096, 4):
        entries = [cpio.directory("bin"), cpio.file("bin/a", b"\1" * lead),
                   cpio.file("bin/b" + "x" * 50, data)]
        out = io.BytesIO()
        cpio.write(out, entries)
        archive = out.getvalue()
        assert _page_aligned(archive, data), lead
        assert cpio.read_names(archive) == {e.path: (e.mode, e.data) for e in entries}
        assert archive.count(b"bin\0") in (1, 2)
        if lead == 3700:
            assert archive.count(b"bin\0") == 2


def test_cpio_rejects_duplicates():
    with pytest.raises(ValueError):
        cpio.write(io.BytesIO(), [cpio.directory("a"), cpio.directory("a")])


def test_config_mismatches_reports_missing_and_forbidden():
    fragment = "CONFIG_A=y\nCONFIG_S=\"x y\"\n# CONFIG_B is not set\n"
    assert kernel.config_mismatches('CONFIG_A=y\nCONFIG_S="x y"\n', fragment) == []
    bad = kernel.config_mismatches("CONFIG_B=y\n", fragment)
    assert "CONFIG_A=unset (want y)" in bad and "CONFIG_B=y (want unset)" in bad


def _elf_with_note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """A minimal ELF64 with one PT_NOTE program header."""
    note = struct.pack("<III", len(name) + 1, len(desc), ntype) + name + b"\0"
    note += b"\0" * (-len(note) % 4) + desc + b"\0" * (-len(desc) % 4)
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<QQ", ehdr, 0x20, 64, 0)
    struct.pack_into("<HHHHH", ehdr, 0x36, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", elf.PT_NOTE, 4, 120, 0, 0, len(note), len(note), 4)
    return bytes(ehdr) + phdr + note


def test_pvh_note_found(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(_elf_with_note(b"Xen", elf.XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", 0x1000850)))
    assert elf.pvh_entry(path) == 0x1000850
    path.write_bytes(_elf_with_note(b"GNU", 3, b"abcd"))
    assert elf.pvh_entry(path) is None


def test_extract_vmlinux_from_synthetic_gzip_bzimage():
    payload_elf = b"\x7fELF" + bytes(range(200)) * 10
    compressed = gzip.compress(payload_elf) + struct.pack("<I", len(payload_elf))
    setup_sects = 1
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", image, 0x248, 16, len(compressed))
    image += b"\0" * 16 + compressed
    assert debian.extract_vmlinux(bytes(image)) == payload_elf
    with pytest.raises(ImageError):
        debian.extract_vmlinux(b"\0" * 4096)


def test_raw_disk_sectors_are_self_describing():
    s = disk.sector_bytes(7)
    assert len(s) == disk.SECTOR and s.startswith(b"VMSH-SECTOR 00000007\n")


def test_missing_tool_names_the_package(monkeypatch):
    from vmsh.images import tools

    monkeypatch.setattr(tools.shutil, "which", lambda tool: None)
    with pytest.raises(ImageError, match="apt-get install lz4"):
        tools.require_tools(["lz4"])


def test_cli_errors_are_one_line(capsys, tmp_path, monkeypatch):
    from vmsh.images import cli

    monkeypatch.setenv("VMSH_IMAGE_CACHE", str(tmp_path))
    assert cli.main(["path", "no-such-image"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: unknown image 'no-such-image'") and "Traceback" not in err
    assert cli.main(["path", "disk"]) == 1
    assert "vmsh images build" in capsys.readouterr().err


def test_build_is_atomic_and_second_build_is_a_no_op(tmp_path, monkeypatch):
    from vmsh.images import targets

    monkeypatch.setenv("VMSH_IMAGE_CACHE", str(tmp_path))
    calls = []

    def fake_build(out, logfile):
        calls.append(out)
        (out / "file").write_text("x")
        return {}

    def failing_build(out, logfile):
        (out / "half").write_text("x")
        raise ImageError("boom")

    monkeypatch.setitem(targets.TARGETS, "fake", targets.Target("fake", lambda: {"a": "1"}, fake_build))
    monkeypatch.setitem(targets.TARGETS, "bad", targets.Target("bad", lambda: {"a": "2"}, failing_build))
    first, built = targets.build("fake")
    assert built and (first / "file").read_text() == "x" and (first / "build-info.json").exists()
    again, built = targets.build("fake")
    assert again == first and not built and len(calls) == 1
    with pytest.raises(ImageError):
        targets.build("bad")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("bad", ".tmp-bad"))] == []


def test_stale_staging_dirs_are_removed(tmp_path, monkeypatch):
    from vmsh.images import targets

    monkeypatch.setenv("VMSH_IMAGE_CACHE", str(tmp_path))
    stale = tmp_path / ".tmp-fake2-0123-abc"
    stale.mkdir()
    (stale / "half").write_text("x")
    monkeypatch.setitem(targets.TARGETS, "fake2",
                        targets.Target("fake2", lambda: {"b": "1"}, lambda out, log: {}))
    targets.build("fake2")
    assert not stale.exists()
