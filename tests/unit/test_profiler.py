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
    base = 0xFFFFC90000003F00
    sampler._raw = [(0xFFFFFFFF81000310, 0, base, frame + outer + beyond_text + b"\x01"),  # a torn last word
                    (0xFFFFFFFF81000320, base + 8, base, frame + frame + outer),  # middle twice: counted once
                    (0xFFFFFFFF81000120, 0, base, b"")]
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


def test_init_text_is_code_and_data_is_not() -> None:
    sym = Symbolizer([(0xFFFFFFFF81000000, "_stext"), (0xFFFFFFFF81000100, "f"),
                      (0xFFFFFFFF81000400, "_etext"), (0xFFFFFFFF81800000, "_sinittext"),
                      (0xFFFFFFFF81800100, "an_initcall"), (0xFFFFFFFF81900000, "_einittext")])
    assert sym.is_code(0xFFFFFFFF81000110) and sym.is_code(0xFFFFFFFF81800110)
    assert not sym.is_code(0xFFFFFFFF81000500) and not sym.is_code(0xFFFFFFFF81900010)
    sampler = RipSampler([], hz=100)
    sampler.stacks.update({(0xFFFFFFFF81000110, (0xFFFFFFFF81800110, 0xFFFFFFFF81000500)): 1})
    assert sampler.folded_stacks(sym) == "an_initcall;f 1\n"
    assert Symbolizer([(0x1000, "f")]).is_code(0x5000)  # no _etext: nothing to tell by


def _words(*values: int) -> bytes:
    return b"".join(v.to_bytes(8, "little") for v in values)


def test_a_whole_frame_pointer_chain_replaces_the_scan() -> None:
    base = 0xFFFFC90000003E00
    sampler = RipSampler([], hz=100)
    # rsp: a stale text address, then two frames: (saved rbp, return address)
    stack = _words(0xFFFFFFFF81000250, base + 24, 0xFFFFFFFF81000210, base + 40, 0xFFFFFFFF81000110,
                   0, 0xFFFFFFFF81000010)
    sampler._raw = [(0xFFFFFFFF81000310, base + 8, base, stack)]
    sampler._parse_stacks()
    assert sampler.stacks == {(0xFFFFFFFF81000310, (0xFFFFFFFF81000210, 0xFFFFFFFF81000110,
                                                    0xFFFFFFFF81000010)): 1}


def test_a_frame_pointer_chain_goes_on_through_the_pt_regs_of_interrupted_kernel_code() -> None:
    base = 0xFFFFC90000003000
    handler, interrupted, caller = 0xFFFFFFFF81000210, 0xFFFFFFFF81000350, 0xFFFFFFFF81000110
    regs = [0] * 21  # struct pt_regs: bp is word 4, ip word 16
    regs[4], regs[16] = base + 8 * 24, interrupted
    words = [0, base + 8 * 3 + 1, handler, *regs, 0, caller]
    sampler = RipSampler([], hz=100)
    sampler._raw = [(0xFFFFFFFF81000310, base + 8, base, _words(*words))]
    sampler._parse_stacks()
    assert list(sampler.stacks) == [(0xFFFFFFFF81000310, (handler, interrupted, caller))]
    # user code was interrupted: the chain ends at its pt_regs
    regs[16] = 0x401000
    sampler = RipSampler([], hz=100)
    sampler._raw = [(0xFFFFFFFF81000310, base + 8, base, _words(0, base + 8 * 3 + 1, handler, *regs))]
    sampler._parse_stacks()
    assert list(sampler.stacks) == [(0xFFFFFFFF81000310, (handler,))]


def test_a_broken_frame_pointer_chain_falls_back_to_the_scan() -> None:
    base = 0xFFFFC90000003E00
    text = (0xFFFFFFFF81000250, 0xFFFFFFFF81000210, 0xFFFFFFFF81000110)
    cases = {
        "rbp outside the stack": (_words(0, text[0], 0, text[1], 0, text[2]), 0x1000),
        "a saved rbp below its frame": (_words(base, text[0], base, text[1], 0, text[2]), base + 16),
        "a return address outside text": (_words(base + 16, 0x1234, text[0], text[1], 0, text[2]), base),
        "no zero frame before the end": (_words(0, text[0], 0, text[1], base + 40, text[2]), base + 32),
    }
    for name, (stack, rbp) in cases.items():
        sampler = RipSampler([], hz=100)
        sampler._raw = [(0xFFFFFFFF81000310, rbp, base, stack)]
        sampler._parse_stacks()
        assert sampler.stacks == {(0xFFFFFFFF81000310, text): 1}, name


def test_no_inclusive_view_without_stacks() -> None:
    sampler = RipSampler([], hz=100)
    sampler.samples.update({0x100: 1})
    assert sampler.inclusive_report(Symbolizer([(0x100, "a")])) == ""
    assert "inclusive" not in sampler.report(Symbolizer([(0x100, "a")]))


def test_stack_is_read_only_in_64_bit_kernel_mode() -> None:
    class Seg:
        def __init__(self, dpl: int, l: int) -> None:  # noqa: E741 - the descriptor's L bit
            self.dpl, self.l = dpl, l

    class Sregs:
        def __init__(self, dpl: int, l: int) -> None:  # noqa: E741 - the descriptor's L bit
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
