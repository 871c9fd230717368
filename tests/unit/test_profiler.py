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
