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
