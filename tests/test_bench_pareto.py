"""bench/pareto.py: its rows, the verdict (our best row at no more bits), the report and the plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import pareto


def _row(label, kind, bits_linears, bits_all, ppl):
    return {"label": label, "kind": kind, "how": "", "bits_linears": bits_linears, "bits_all": bits_all,
            "ppl": {"ppl": ppl, "protocol": "ORT"} if ppl is not None else None}


ROWS = [
    _row("ours-spqr-target3", "ours", 3.0, 9.0, 40.0),
    _row("ours-spqr-target4", "ours", 4.0, 9.8, 31.0),
    _row("ours-spqr-target4.5", "ours", 4.5, 10.2, 30.0),
    _row("llama.cpp-IQ4_XS", "llamacpp", 4.44, 4.9, 32.4),   # ours at 4.0: 31.0 < 32.4 (linears); none ≤ 4.9 (all)
    _row("llama.cpp-Q4_0", "llamacpp", 4.51, 5.4, 29.5),     # ours at ≤ 4.51: 4.5 → 30.0 > 29.5, loses
    _row("genai-rtn-b32", "genai", 5.0, 10.0, 40.2),         # all: ours at 9.8 (31.0) wins
    _row("llama.cpp-IQ1_M", "llamacpp", 2.5, 3.5, None),     # no perplexity: not judged
]


def test_verdict_finds_our_best_row_at_no_more_bits():
    by_label = {v["label"]: v for v in pareto.verdict(ROWS)}
    assert set(by_label) == {"llama.cpp-IQ4_XS", "llama.cpp-Q4_0", "genai-rtn-b32"}
    iq4 = by_label["llama.cpp-IQ4_XS"]
    assert iq4["bits_linears"]["ours"] == "ours-spqr-target4" and iq4["bits_linears"]["wins"]
    assert iq4["bits_all"]["ours"] is None and not iq4["bits_all"]["wins"]
    q40 = by_label["llama.cpp-Q4_0"]
    assert q40["bits_linears"]["ours"] == "ours-spqr-target4.5" and not q40["bits_linears"]["wins"]
    genai = by_label["genai-rtn-b32"]
    assert genai["bits_linears"]["ours"] == "ours-spqr-target4.5" and genai["bits_linears"]["wins"]
    assert genai["bits_all"]["ours"] == "ours-spqr-target4" and genai["bits_all"]["wins"]


def test_report_and_plot(tmp_path):
    result = {"date": "2026-12-07", "command": ".venv/bin/python -m bench.pareto", "source": "model.gguf",
              "environment": {"cpu": "cpu"}, "protocol": {"windows": 40, "seqlen": 512, "windows_sha256": "ab" * 32},
              "rows": ROWS, "notes": ["a note"]}
    result["verdict"] = pareto.verdict(ROWS)
    text = pareto.render(result)
    assert "| llama.cpp-IQ4_XS | PyTorch fp32 | 4.440 | 4.900 | 32.400 |" in text
    assert "| llama.cpp-Q4_0 | 29.500 | 4.510 | ours-spqr-target4.5 | 30.000 | **no** |" in text
    assert "1 of 3 peer rows beaten on both bits columns." in text
    png = tmp_path / "p.png"
    pareto.plot(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_rows_cover_every_point_once():
    rows = pareto.all_rows(Path("/nonexistent"))
    labels = [r.label for r in rows]
    assert len(labels) == len(set(labels))
    assert {f"ours-spqr-target{t:g}" for t in pareto.TARGETS} <= set(labels)
    assert {f"llama.cpp-{t}" for t in pareto.GGUF_TYPES} <= set(labels)
    assert sum(label.startswith("genai-") for label in labels) == 6
    assert sum(label.startswith("ort-") for label in labels) == 4
    for name, flags in pareto.OURS_POINTS.items():  # every row of ours: 8-bit head, fp32 activations, one calibration
        assert flags[flags.index("--lm-head") + 1] == "rtn" and flags[flags.index("--accuracy-level") + 1] == "0"
        assert "--lm-head-bits" not in flags  # rtn's default: the 8-bit table
        assert "--nsamples" in flags and ("--target-bits" in flags) == name.startswith("spqr-target")


@pytest.mark.parametrize("text, expected", [
    ("noise\ntime: load 27.2s, quantize 658.7s, export 88.3s, passes 3.3s, emit 2.2s\npeak ...\n", 779.7),
    ("no timing line\n", None),
])
def test_export_seconds_from_log(tmp_path, text, expected):
    log = tmp_path / "x.log"
    log.write_text(text)
    got = pareto.export_seconds_from_log(log)
    assert got == (pytest.approx(expected) if expected is not None else None)
    assert pareto.export_seconds_from_log(tmp_path / "missing.log") is None


def test_allocation_of_a_target_bits_folder(tmp_path):
    import json

    (tmp_path / "quant_config.json").write_text(json.dumps({
        "allocation": {"settings": {"w3g32": {"linears": 2, "params": 300}, "w4g32-inorder-fp16": {"linears": 1,
                                                                                                  "params": 100}},
                       "probe_seconds": {"gradients": 1.0, "settings": 2.0}},
        "layers": {"model.layers.0.self_attn.v_proj": {"setting": "w4g32-inorder-fp16"},
                   "model.layers.0.self_attn.q_proj": {"setting": "w3g32"},
                   "model.layers.1.self_attn.q_proj": {"setting": "w3g32"}}}))
    got = pareto.allocation_of(tmp_path)
    assert got["settings"] == {"w3g32": 75.0, "w4g32-inorder-fp16": 25.0}
    assert got["by_projection"] == {"q_proj": {"w3g32": 2}, "v_proj": {"w4g32-inorder-fp16": 1}}
    assert pareto.allocation_of(tmp_path / "missing") == {}


def test_measured_probe_is_a_target_folder_that_probed(tmp_path):
    """Only a target row whose own export measured its probe is offered for reuse (not one that reused another's,
    nor an export without a probe)."""
    import json

    def write(name: str, allocation: dict) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "quant_config.json").write_text(json.dumps({"allocation": allocation}))

    assert pareto.measured_probe(tmp_path) is None
    write("spqr-target2.5", {"probe": {"linears": {}}, "probe_from": "/x/quant_config.json"})  # itself a reuse
    write("spqr-target3", {"settings": {}})  # no probe recorded
    assert pareto.measured_probe(tmp_path) is None
    write("spqr-target4", {"probe": {"linears": {}}, "probe_from": None})
    assert pareto.measured_probe(tmp_path) == tmp_path / "spqr-target4"
