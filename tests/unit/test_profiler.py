"""Rip profiler: symbolization and the report."""

from __future__ import annotations

from pathlib import Path

from vmsh.engine.profiler import RipSampler, Symbolizer


def test_symbolizer_reads_text_symbols(tmp_path: Path) -> None:
    m = tmp_path / "System.map"
    m.write_text("ffffffff81000000 T _text\nffffffff81000100 t helper\nffffffff82000000 D some_data\n")
    sym = Symbolizer.from_system_map(str(m))
    assert sym.lookup(0xFFFFFFFF81000050) == "_text"
    assert sym.lookup(0xFFFFFFFF81000180) == "helper"
    assert sym.lookup(0x1000) == "0x1000"


def test_report_groups_by_symbol() -> None:
    sampler = RipSampler([], hz=100)
    sampler.samples.update({0x100: 3, 0x180: 1, 0x400: 4})
    report = sampler.report(Symbolizer([(0x100, "a"), (0x300, "b")]))
    assert report.splitlines()[0] == "8 samples"
    assert "50.00%       4  a" in report and "50.00%       4  b" in report


def test_timeline_groups_samples_by_slice() -> None:
    sampler = RipSampler([], hz=100)
    sampler.timeline.extend([(0.1, 0x100), (0.5, 0x100), (1.2, 0x400), (3.9, 0x400), (3.95, 0x110)])
    text = sampler.timeline_report(Symbolizer([(0x100, "a"), (0x300, "b")]), slice_seconds=1.0, top=2)
    lines = text.splitlines()
    assert lines[0].startswith("timeline (1 s slices")
    assert lines[1].split() == ["0.0s", "2", "a", "100%"]
    assert lines[2].split() == ["1.0s", "1", "b", "100%"]
    assert lines[3].split() == ["3.0s", "2", "b", "50%", "a", "50%"]  # slice 2 has no samples: no line
    assert len(lines) == 4


def test_report_appends_timeline_and_keeps_totals_first() -> None:
    sampler = RipSampler([], hz=100)
    sampler.samples.update({0x100: 2})
    sampler.timeline.extend([(0.0, 0x100), (2.5, 0x100)])
    report = sampler.report(Symbolizer([(0x100, "a")]))
    assert report.splitlines()[0] == "2 samples"
    assert "timeline (2 s slices" in report
    sampler.slice_seconds = 0
    assert "timeline" not in sampler.report()


def test_stacks_give_an_inclusive_view() -> None:
    sym = Symbolizer([(0xFFFFFFFF81000000, "_text"), (0xFFFFFFFF81000100, "outer"),
                      (0xFFFFFFFF81000200, "middle"), (0xFFFFFFFF81000300, "leaf"),
                      (0xFFFFFFFF81000400, "_etext")])
    sampler = RipSampler([], hz=100)
    frame = (0xFFFFFFFF81000210).to_bytes(8, "little") + (0x1234).to_bytes(8, "little")
    outer = (0xFFFFFFFF81000110).to_bytes(8, "little")
    beyond_text = (0xFFFFFFFF81000500).to_bytes(8, "little")
    sampler._raw = [(0xFFFFFFFF81000310, frame + outer + beyond_text + b"\x01"),  # a torn last word
                    (0xFFFFFFFF81000320, frame + frame + outer),  # middle twice: counted once
                    (0xFFFFFFFF81000120, b"")]
    sampler.samples.update({0xFFFFFFFF81000310: 1, 0xFFFFFFFF81000320: 1, 0xFFFFFFFF81000120: 1})
    sampler._parse_stacks()
    assert sampler.stacks[0xFFFFFFFF81000310, (0xFFFFFFFF81000210, 0xFFFFFFFF81000110,
                                                0xFFFFFFFF81000500)] == 1
    text = sampler.inclusive_report(sym)
    lines = text.splitlines()
    assert lines[0].startswith("inclusive (3 samples")
    assert lines[1].split() == ["100.00%", "3", "outer"]
    assert sorted(line.split()[2] for line in lines[2:4]) == ["leaf", "middle"]
    assert [line.split()[1] for line in lines[2:4]] == ["2", "2"] and len(lines) == 4
    assert "_etext" not in text  # an address past the end of text is not a return address
    assert "inclusive" in sampler.report(sym)


def test_no_inclusive_view_without_stacks() -> None:
    sampler = RipSampler([], hz=100)
    sampler.samples.update({0x100: 1})
    assert sampler.inclusive_report(Symbolizer([(0x100, "a")])) == ""
    assert "inclusive" not in sampler.report(Symbolizer([(0x100, "a")]))


def test_stack_is_read_only_in_64_bit_kernel_mode() -> None:
    class Seg:
        def __init__(self, dpl: int, l: int) -> None:
            self.dpl, self.l = dpl, l

    class Sregs:
        def __init__(self, dpl: int, l: int) -> None:
            self.cs = Seg(dpl, l)
            self.cr0 = self.cr3 = self.cr4 = self.efer = 0

    class Fd:
        def __init__(self, sregs: Sregs) -> None:
            self.sregs = sregs

        def get_sregs(self) -> Sregs:
            return self.sregs

    sampler = RipSampler([], hz=100, memory=object())
    assert sampler._read_stack(Fd(Sregs(3, 1)), 0xFFFFC90000003F00) is None  # user mode
    assert sampler._read_stack(Fd(Sregs(0, 0)), 0xFFFFC90000003F00) is None  # not 64-bit
    assert sampler._read_stack(Fd(Sregs(0, 1)), 0x7FFF0000) is None  # a user-space rsp


def test_folded_stacks_run_outermost_to_innermost() -> None:
    sym = Symbolizer([(0x1000, "_text"), (0x1100, "outer"), (0x1200, "middle"), (0x1300, "leaf"),
                      (0x1400, "_etext")])
    sampler = RipSampler([], hz=100)
    sampler.stacks.update({(0x1310, (0x1210, 0x1220, 0x1110)): 1, (0x1320, (0x1210, 0x1110)): 1,
                           (0x1110, ()): 1})
    assert sampler.folded_stacks(sym) == "outer;middle;leaf 2\nouter 1\n"
