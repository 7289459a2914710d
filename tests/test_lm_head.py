"""`--lm-head rtn` (qcompiler/quantize/lm_head.py): the output projection becomes one more SpQRMatMul, validated like
the decoder's linears and reported apart from them in quant_config.json. A tied embedding is served from it
(passes/embed_from_lm_head.py: `qcompiler::SpQRGather` over the SpQRMatMul's initializers, the float table gone); an
untied one keeps its table."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

HEAD = ("--lm-head", "rtn", "--lm-head-bits", "4", "--lm-head-group-size", "16")
RTN = ("--bits", "3", "--group-size", "16")


@pytest.mark.parametrize("kind", ["llama", "llama3"])  # untied, tied
def test_lm_head_is_a_spqr_matmul_and_the_embedding_stays(kind, tiny_export, tiny_dirs):
    from qcompiler.graph.format import DOMAIN, OP_TYPE
    from qcompiler.graph.onnx_op import node_parts, weight_from_node
    from tests.helpers import tiny_model

    folder = tiny_export(kind, "rtn", *RTN, *HEAD)
    plain = tiny_export(kind, "rtn", *RTN)
    cfg, plain_cfg = (json.loads((f / "quant_config.json").read_text()) for f in (folder, plain))
    proto = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN}
    assert "lm_head/SpQRMatMul" in nodes
    assert sum(len(node_parts(n)) for n in nodes.values()) == plain_cfg["n_quantized_layers"] + 1
    assert not [n for n in proto.graph.node if n.op_type == "MatMul"]  # no fp32 projection left
    source = tiny_model(kind)
    head = weight_from_node(nodes["lm_head/SpQRMatMul"], inits)
    assert (head.N, head.K, head.bits, head.group_size) == (source.config.vocab_size, source.config.hidden_size, 4, 16)
    # the decoded head is the RTN grid of the source weight: error of a 4-bit grid, not more
    w = source.lm_head.weight.detach().numpy()
    err = np.abs(head.dequantize() - w).max()
    assert 0 < err <= np.abs(w).max() / 15 * 1.01
    tied = kind == "llama3"
    tables = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in inits
              and tuple(inits[n.input[0]].dims) == (head.N, head.K)]
    gathers = [n for n in proto.graph.node if n.op_type == "SpQRGather"]
    if tied:  # the lookup reads the lm_head's own initializers; no float table left
        assert not tables and len(gathers) == 1
        assert list(gathers[0].input[1:]) == list(nodes["lm_head/SpQRMatMul"].input[1:4])
        assert not [t for t in inits.values() if tuple(t.dims) == (head.N, head.K)]
    else:  # the lookup reads the untouched full-precision table
        assert not gathers and len(tables) == 1
        table = numpy_helper.to_array(inits[tables[0].input[0]])
        assert np.array_equal(table, source.get_input_embeddings().weight.detach().numpy())
    assert cfg["lm_head"]["tied"] is tied and cfg["lm_head"]["bits"] == 4
    assert cfg["lm_head"]["embedding"] == ("SpQRGather" if tied else "table")
    assert cfg["validation"]["passed"] and cfg["validation"]["max_abs_logit_diff"] <= cfg["validation"]["limit"]
    # decoder-linear bits are the method's; all parameters count the tied table once, stored quantized once
    bits, plain_bits = cfg["bits_per_param"], plain_cfg["bits_per_param"]
    assert bits["decoder_linears"] == plain_bits["decoder_linears"] and bits["params_all"] == plain_bits["params_all"]
    table_bits = head.N * head.K * 32
    head_bits = sum(head.stored_bits().values())
    assert bits["all"] == pytest.approx(plain_bits["all"] + (head_bits - table_bits) / bits["params_all"])
    size = (folder / "model.onnx.data").stat().st_size
    plain_size = (plain / "model.onnx.data").stat().st_size
    assert size < plain_size - table_bits / 8 * 0.8  # the float table left the folder


@pytest.mark.parametrize("kind", ["llama", "llama3"])
def test_folder_back_in_pytorch(kind, tiny_export):
    """`eval --backend torch` rebuilds the fake-quant model: an untied embedding keeps its table, a tied one reads
    the decoded lm_head (as the graph's SpQRGather does), and the logits are the folder's in ONNX Runtime."""
    from qcompiler.runtime.evaluate import torch_model_from_folder
    from qcompiler.runtime.generate import Generator, _Concatenated
    from tests.helpers import tiny_model

    folder = tiny_export(kind, "rtn", *RTN, *HEAD)
    model, _ = torch_model_from_folder(folder)
    source = tiny_model(kind)
    assert not torch.equal(model.lm_head.weight, source.lm_head.weight)
    embedding = model.get_input_embeddings().weight
    assert torch.equal(embedding, model.lm_head.weight if kind == "llama3" else source.get_input_embeddings().weight)
    ids = np.arange(3, 19)[None]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    got = _Concatenated(Generator(folder))(ids, 0)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_gather_function_matches_the_reference():
    """SpQRGather's standard-op function (qcompiler/graph/gather_op.py) against its NumPy reference, every code
    width, a ragged last group, indices of any shape."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from qcompiler.graph.format import DOMAIN
    from qcompiler.graph.gather_op import INPUT_NAMES, gather_function, reference
    from tests.builders import random_weight

    for bits in (2, 3, 4):
        w = random_weight(N=37, K=72, bits=bits, group_size=16, stat_bits=0, stat_group_size=16, outlier_rate=0.0,
                          permute=False, seed=bits)
        inits = [numpy_helper.from_array(a, n) for n, a in
                 (("qweight", w.qweight), ("scales", w.scales), ("zeros", w.zeros))]
        node = helper.make_node("SpQRGather", list(INPUT_NAMES), ["Y"], domain=DOMAIN, K=72, N=37, bits=bits,
                                group_size=16)
        node.overload = f"w{bits}"
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("indices", TensorProto.INT64, [2, 3])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3, 72])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                                  functions=[gather_function(bits)], ir_version=10)
        idx = np.array([[0, 36, 5], [5, 17, 2]], np.int64)
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"indices": idx})[0]
        assert got.shape == (2, 3, 72) and np.array_equal(got, reference(idx, w)), bits


def test_lm_head_errors(tiny_dirs, tmp_path, capsys):
    from tests.helpers import run_cli

    code, _, err = run_cli(capsys, "export", tiny_dirs("llama"), "--lm-head", "rtn", "--lm-head-bits", "8",
                           "-o", tmp_path / "a", "-q")
    assert code != 0 and "bits" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "export", tiny_dirs("llama"), "--method", "affinequant", "--lm-head", "rtn",
                           "-o", tmp_path / "b", "-q")
    assert code != 0 and "--lm-head is not supported" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
