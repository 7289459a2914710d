"""bench/node_profile.py: per-node decode-step profile of exported folders."""

from __future__ import annotations

import json

import onnx

from bench import node_profile


def test_linear_key_folds_layer_indices():
    assert node_profile.linear_key("model.layers.12.mlp.down_proj/SpQRMatMul") == "L.mlp.down_proj/SpQRMatMul"
    assert node_profile.linear_key("/model/layers.3/attn/qkv_proj/MatMul_Q4") == "L.attn/qkv_proj/MatMul_Q4"
    assert node_profile.linear_key("lm_head/SpQRMatMul") == "lm_head/SpQRMatMul"


def test_profile_of_a_tiny_export(tiny_export, tmp_path):
    folder = tiny_export("llama", "rtn", "--bits", "4", "--group-size", "16")
    out = tmp_path / "profile.md"
    assert node_profile.main([str(folder), "--threads", "1", "--prompt", "5", "--steps", "3", "--rounds", "2",
                              "-o", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    summary = result["folders"][str(folder)]["1"]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    spqr = [n.name for n in graph.node if n.op_type == "SpQRMatMul"]
    assert summary["nodes_per_step"]["SpQRMatMul"] == len(spqr)  # every node, the prefill's events left out
    assert summary["ms_per_step"]["SpQRMatMul"] > 0
    # one row per linear with layers folded (the tiny model's fp32 lm_head MatMul too)
    assert {node_profile.linear_key(n) for n in spqr} < set(summary["linear_us"])
    assert len({node_profile.linear_key(n) for n in spqr}) < len(spqr)
    assert summary["total_ms"] >= sum(summary["ms_per_step"].values()) * 0.999
    assert "| SpQRMatMul |" in out.read_text()


def test_a_folder_without_genai_config_is_refused(tmp_path, capsys):
    (tmp_path / "model.onnx").write_bytes(b"")
    assert node_profile.main([str(tmp_path)]) == 2
    assert "has no model.onnx and genai_config.json" in capsys.readouterr().err
