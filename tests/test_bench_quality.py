"""bench/quality.py: the preset table, the MatMulNBits bit count, and the ORT-quantizer wrapper on tiny graphs."""

from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

@pytest.fixture(scope="module")
def bench():
    from bench import quality

    return quality

def _tiny_lm(K=64, N=96, V=40, seed=0) -> tuple[onnx.ModelProto, dict]:
    """input_ids → Gather(E [V, K]) → MatMul W1 [K, N] ("node_linear") → MatMul W2 [N, K] ("node_extra", not in the
    manifest) → MatMul Transpose(E) (tied lm_head) → logits; attention_mask/position_ids are fed like our exports."""
    rng = np.random.default_rng(seed)
    E = rng.standard_normal((V, K)).astype(np.float32)
    W1 = (rng.standard_normal((K, N)) / 8).astype(np.float32)
    W2 = (rng.standard_normal((N, K)) / 8).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"], name="node_embedding"),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT, name="cast_mask"),
        helper.make_node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT, name="cast_pos"),
        helper.make_node("Mul", ["mask_f", "pos_f"], ["mp"], name="mul_mp"),
        helper.make_node("Unsqueeze", ["mp", "axes"], ["mp3"], name="unsq"),
        helper.make_node("Mul", ["mp3", "zero"], ["mp0"], name="mul_zero"),
        helper.make_node("Add", ["emb", "mp0"], ["h0"], name="add_h0"),
        helper.make_node("MatMul", ["h0", "W1"], ["h1"], name="node_linear"),
        helper.make_node("MatMul", ["h1", "W2"], ["h2"], name="node_extra"),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="transpose_lm"),
        helper.make_node("MatMul", ["h2", "Et"], ["logits"], name="node_lm_head"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", V])],
        [numpy_helper.from_array(E, "E"), numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2"),
         numpy_helper.from_array(np.array([2], np.int64), "axes"), numpy_helper.from_array(np.float32(0), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    manifest = {"linears": {"model.layers.0.mlp.up_proj": {"op": "MatMul", "node": "node_linear", "weight": "W1",
                                                           "in_features": K, "out_features": N}}}
    return model, manifest

def _run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                 "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]})[0]

def test_presets_are_unique_and_match_method_configs(bench):
    from qcompiler.quantize.methods import available_methods, get_method

    names = [p["name"] for p in bench.PRESETS]
    assert len(names) == len(set(names))
    assert bench.PRESETS[0]["method"] == "none"
    for p in bench.PRESETS:
        if p["method"] in available_methods():  # a renamed Config field breaks the preset here, not mid-run
            get_method(p["method"]).Config(**p["options"])

def test_select_presets(bench):
    picked = [p["name"] for p in bench.select_presets(bench.PRESETS, "none,ort-gptq")]
    assert picked == ["fp32", "ort-gptq-w4b32", "ort-gptq-w4b64"]
    assert [p["name"] for p in bench.select_presets(bench.PRESETS, "rtn-w4g16")] == ["rtn-w4g16"]
    assert len(bench.select_presets(bench.PRESETS, None)) == len(bench.PRESETS)
    with pytest.raises(bench.BenchError, match="no preset matches awq"):
        bench.select_presets(bench.PRESETS, "rtn,awq")

def test_flags_of(bench):
    assert bench.flags_of({"method": "rtn", "options": {"bits": 4, "group_size": 32, "round_zero": False}}) == \
        "--method rtn --bits 4 --group-size 32 --no-round-zero"

@pytest.mark.parametrize("bits,block", [(4, 32), (4, 64), (2, 32)])
def test_default_quantizer_excludes_other_matmuls_and_counts_bits(bench, bits, block):
    K, N = 96, 64  # K = 96: 3 blocks of 32 (odd), 2 of 64 (ragged last block, padded)
    model, manifest = _tiny_lm(K=K, N=N)
    ids = np.array([[1, 5, 7, 3, 9]], np.int64)
    ref = _run(model, ids)
    out, info = bench.ort_quantize(copy.deepcopy(model), manifest,
                                   {"algorithm": "DEFAULT", "bits": bits, "block_size": block}, progress=False)

    nbits = [n for n in out.graph.node if n.op_type == "MatMulNBits"]
    assert [n.name for n in nbits] == [f"node_linear_Q{bits}"]
    assert sorted(info["excluded"]) == ["node_extra", "node_lm_head"]
    assert sum(n.op_type == "MatMul" for n in out.graph.node) == 2

    blocks = math.ceil(K / block)
    expected = {"weights": N * blocks * block * bits, "scales": N * blocks * 32,
                "zero_points": N * math.ceil(blocks * bits / 8) * 8, "g_idx": 0}
    assert info["bits"]["bits"] == expected
    assert info["bits"]["params"] == K * N and info["bits"]["nodes"] == 1
    assert info["bits"]["avg_bits"] == pytest.approx(sum(expected.values()) / (K * N))

    got = _run(out, ids)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < rel < (0.15 if bits == 4 else 0.8)  # quantized, and still the same function

def test_rtn_with_odd_blocks_per_row_says_why(bench):
    model, manifest = _tiny_lm(K=96)
    with pytest.raises(bench.BenchError, match="odd number of blocks: K=96 / block 32 = 3 blocks"):
        bench.ort_quantize(model, manifest, {"algorithm": "RTN", "bits": 4, "block_size": 32}, progress=False)
    with pytest.raises(bench.BenchError, match="4-bit MatMulNBits only"):
        bench.ort_quantize(model, manifest, {"algorithm": "GPTQ", "bits": 2, "block_size": 32}, progress=False)

def test_ort_gptq_memoized_sessions_give_the_same_weights(bench):
    """The bench's GPTQ (one forward per calibration sample, nodes_to_exclude honoured) writes exactly the
    initializers of ORT's own unpatched GPTQ run, and quantizes only the manifest's linear."""
    import torch
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    model, manifest = _tiny_lm(K=64, N=128)  # both weights have an even number of 32-blocks per row
    rng = np.random.default_rng(1)
    windows = [torch.from_numpy(rng.integers(0, 40, (1, 16))) for _ in range(3)]
    opts = {"algorithm": "GPTQ", "bits": 4, "block_size": 32, "actorder": False, "percdamp": 0.01}
    ours, info = bench.ort_quantize(copy.deepcopy(model), manifest, opts, calibration=windows,
                                    kv={"num_layers": 0, "num_kv_heads": 1, "head_dim": 1}, progress=False)
    assert [n.name for n in ours.graph.node if n.op_type == "MatMulNBits"] == ["node_linear_Q4"]

    reader = bench._CalibrationReader(windows, {"num_layers": 0, "num_kv_heads": 1, "head_dim": 1})
    config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, percdamp=0.01, actorder=False)
    plain = mnq.MatMulNBitsQuantizer(copy.deepcopy(model), block_size=32, algo_config=config)
    plain.model.model.ir_version = 10
    with contextlib.redirect_stdout(io.StringIO()):
        plain.process()
    # ORT's own GPTQ path ignores nodes_to_exclude: it quantizes node_extra too (the bench marks it "fp32")
    assert sorted(n.name for n in plain.model.model.graph.node if n.op_type == "MatMulNBits") == \
        ["node_extra_Q4", "node_linear_Q4"]
    theirs = {t.name: numpy_helper.to_array(t) for t in plain.model.model.graph.initializer}
    compared = 0
    for t in ours.graph.initializer:
        if t.name.startswith("W1_"):
            np.testing.assert_array_equal(numpy_helper.to_array(t), theirs[t.name])
            compared += 1
    assert compared == 3  # codes, scales, zero points

@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_peak_rss_is_reset_per_export(bench):
    bench._reset_peak_rss()
    if bench._peak_rss_mb() is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    before = bench._peak_rss_mb()
    block = np.ones(50_000_000 // 8)  # 50 MB touched
    grown = bench._peak_rss_mb()
    del block
    bench._reset_peak_rss()
    after = bench._peak_rss_mb()
    assert grown - before > 40
    assert after < grown - 40  # the 50 MB peak is forgotten after a reset
