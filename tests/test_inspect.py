"""`qcompiler inspect`: per-node table from the graph alone, totals consistent with quant_config.json."""

from __future__ import annotations

import json

import pytest

from qcompiler import QCompilerError
from qcompiler.cli import main
from qcompiler.tools.inspect import inspect_model


@pytest.fixture(scope="module")
def exported(tiny_export):
    return tiny_export("llama", "rtn", "--bits", "3", "--group-size", "16")


def test_layers_and_bits_match_the_export(exported):
    layers, meta, total = inspect_model(exported)
    cfg = json.loads((exported / "quant_config.json").read_text())
    # 7 linears x 2 layers, in 4 nodes per layer (q/k/v and gate/up one node each)
    assert sum(li.linears for li in layers) == cfg["n_quantized_layers"] == 14 and len(layers) == 8
    params = sum(li.N * li.K for li in layers)
    assert params == cfg["quantized_params"]
    assert 8 * sum(li.bytes for li in layers) / params == pytest.approx(cfg["avg_bits"], rel=1e-9)
    assert all(li.bits == 3 and li.group_size == 16 for li in layers)
    assert layers[0].name.endswith("/SpQRMatMul") and "layers.0" in layers[0].name
    assert meta["qcompiler.method"] == "rtn" and total > sum(li.bytes for li in layers)


def test_cli_prints_table_and_totals(exported, capsys):
    assert main(["inspect", str(exported), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "qcompiler.method: rtn" in out and "... 5 more nodes" in out
    assert "8 SpQRMatMul nodes (14 linears)" in out


def test_missing_folder(tmp_path):
    with pytest.raises(QCompilerError, match="not found"):
        inspect_model(tmp_path / "nope")


def test_deployment_summary(tiny_export):
    from qcompiler.tools.inspect import deployment_summary

    lines = deployment_summary(tiny_export("llama", "rtn", "--bits", "3", "--group-size", "16"))
    assert lines == ["graph dtype: float32", "portable fallback functions: w3s0 (6 nodes), w3s0_silu_mul (2 nodes)",
                     "op library in folder: libqcompiler_ops.so", "onnxruntime-genai config: genai_config.json"]
    bare = deployment_summary(tiny_export("opt", "rtn", "--bits", "4", "--group-size", "32", "--no-fallback"))
    assert bare[1].startswith("portable fallback functions: none") and bare[3] == "onnxruntime-genai config: no"
