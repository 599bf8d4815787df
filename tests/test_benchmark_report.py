"""benchmarks/report.py: interleaved pairs and their ratios (no timing is asserted here)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import report  # noqa: E402


def test_interleaved_alternates_a_and_b_after_the_warmup():
    calls = []
    a = lambda: calls.append("a") or 2.0
    b = lambda: calls.append("b") or 1.0
    ours, theirs = report.interleaved(a, b, pairs=3, warmup=1)
    assert calls == ["a", "b"] * 4 and ours == [2.0] * 3 and theirs == [1.0] * 3


def test_pair_ratios_give_median_min_and_max_of_each_pair():
    r = report.pair_ratios([1.0, 3.0, 2.0], [1.0, 1.0, 4.0])
    assert r == {"median": 1.0, "min": 0.5, "max": 3.0, "n": 3}
    assert report.fmt_ratio(r) == "1.00× (0.50-3.00, 3 pairs)"
    with pytest.raises(ValueError):
        report.pair_ratios([1.0], [])


def test_write_records_date_command_machine_and_load(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    path = report.write("x", "A title", ["| a | b |"], load_before=0.5)
    text = path.read_text()
    assert text.startswith("# A title") and "load average: 0.5 before" in text
    assert "| a | b |" in text and "cores" in text
