"""bench/ab.py without running models: the paired statistics, argument parsing and the report."""

from __future__ import annotations

import argparse

import pytest

from bench import ab


def test_paired_summary_takes_ratios_round_by_round():
    # B is 10 % faster in every round although the machine's speed halves between rounds: the paired ratio sees 1.1
    # exactly where the medians of A and B alone straddle the drift.
    a = [100.0, 50.0, 100.0, 50.0, 100.0]
    b = [110.0, 55.0, 110.0, 55.0, 110.0]
    s = ab.paired_summary(a, b)
    assert s["ratio"] == pytest.approx(1.1) and s["q1"] == pytest.approx(1.1) and s["q3"] == pytest.approx(1.1)
    assert s["a"] == 100.0 and s["b"] == 110.0 and s["rounds"] == 5
    s = ab.paired_summary([100.0, 100.0, 100.0, 100.0], [90.0, 100.0, 110.0, 120.0])
    assert s["ratio"] == pytest.approx(1.05) and s["q1"] < 1.0 < 1.1 < s["q3"]
    with pytest.raises(ValueError):
        ab.paired_summary([1.0], [1.0, 2.0])


def test_lib_argument_needs_a_label_and_an_existing_file(tmp_path):
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"x")
    assert ab._parse_lib(f"head={lib}") == ("head", lib.resolve())
    for bad in (str(lib), f"head={tmp_path / 'missing.so'}", f"={lib}"):
        with pytest.raises(argparse.ArgumentTypeError):
            ab._parse_lib(bad)


def test_report_has_one_row_per_thread_count():
    row = {"threads": 2, "same_tokens": True,
           "decode_summary": ab.paired_summary([100.0, 90.0], [120.0, 99.0]),
           "prefill_summary": ab.paired_summary([200.0, 200.0], [200.0, 220.0])}
    result = {"date": "2026-12-07", "folder": "OUT", "cpu": "cpu", "seconds": 1.0, "prompt_tokens": 64, "new_tokens": 64,
              "command": "python -m bench.ab OUT", "a": {"label": "base", "path": "a.so", "sha256": "0" * 64},
              "b": {"label": "head", "path": "b.so", "sha256": "1" * 64}, "rows": [row]}
    text = ab.render(result)
    assert "| 2 | 95.0 | 109.5 | 1.150 [1.075–1.225] |" in text and "| yes |" in text
