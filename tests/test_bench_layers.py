"""bench/layer_solve.py and bench/export_graph.py on tiny shapes: what they measure reaches their tables."""

from __future__ import annotations

import json


def test_layer_solve_small_shapes(tmp_path):
    from bench import layer_solve

    out = tmp_path / "ls.md"
    code = layer_solve.main(["--hidden", "64", "--intermediate", "96", "--heads", "4", "--kv-heads", "2",
                             "--vocab", "300", "--nsamples", "2", "--seqlen", "32", "-o", str(out)])
    assert code == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in data["runs"]] == ["gptq", "spqr"] and data["meta"]["device"] == "cpu"
    for run in data["runs"]:
        assert set(run["layers"]) == {"model.layers.0", "model.layers.1"}
        assert all(t["seconds"] > 0 and t["solve"] > 0 for t in run["layers"].values())
        assert 4 < run["avg_bits"] < 6 and 0 < run["rel_error"] < 1
    text = out.read_text()
    assert text.count("| gptq | model.layers.") == 2 and text.count("| spqr | model.layers.") == 2


def test_export_graph_compares_both_constructions(tiny_dirs, tmp_path):
    from bench import export_graph

    out = tmp_path / "eg.md"
    assert export_graph.main(["--source", str(tiny_dirs("llama")), "--rounds", "1", "-o", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["seconds"]) == {"trace", "per-layer"} and data["ratio"] > 0
    assert data["max_abs_diff"]["logits"] == 0.0 and data["nodes"]["per-layer"] > 0
    assert "Ratio trace / per-layer" in out.read_text()
