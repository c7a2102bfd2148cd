"""benchmarks.common: BENCHMARKS.md is assembled from the sections that write_section wrote, once each."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import common


def test_assemble_takes_sections_once_and_skips_included_notes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    results = tmp_path / "benchmarks" / "results"
    monkeypatch.setattr(common, "RESULTS", results)
    monkeypatch.setattr(common, "ROOT", tmp_path)
    results.mkdir(parents=True)
    notes = results / "alpha_notes.md"
    notes.write_text("**Reading.** a hand-written note the alpha section includes\n")
    common.write_section("alpha", "Alpha", "body\n\n" + notes.read_text(), script="bench_alpha")
    common.write_section("beta", "Beta", "see ![plot](beta.png)")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert text.count("**Reading.**") == 1  # through its section only
    assert text.index("## Alpha") < text.index("## Beta")
    assert "](benchmarks/results/beta.png)" in text
