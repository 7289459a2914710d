"""`--lm-head rtn` (qcompiler/quantize/lm_head.py): the output projection becomes one more SpQRMatMul, untied from a
tied embedding (whose lookup keeps the full-precision table), validated like the decoder's linears, and reported
apart from them in quant_config.json."""

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
    from qcompiler.graph.onnx_op import weight_from_node
    from tests.helpers import tiny_model

    folder = tiny_export(kind, "rtn", *RTN, *HEAD)
    plain = tiny_export(kind, "rtn", *RTN)
    cfg, plain_cfg = (json.loads((f / "quant_config.json").read_text()) for f in (folder, plain))
    proto = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN}
    assert "lm_head/SpQRMatMul" in nodes and len(nodes) == plain_cfg["n_quantized_layers"] + 1
    assert not [n for n in proto.graph.node if n.op_type == "MatMul"]  # no fp32 projection left
    source = tiny_model(kind)
    head = weight_from_node(nodes["lm_head/SpQRMatMul"], inits)
    assert (head.N, head.K, head.bits, head.group_size) == (source.config.vocab_size, source.config.hidden_size, 4, 16)
    # the decoded head is the RTN grid of the source weight: error of a 4-bit grid, not more
    w = source.lm_head.weight.detach().numpy()
    err = np.abs(head.dequantize() - w).max()
    assert 0 < err <= np.abs(w).max() / 15 * 1.01
    # the lookup reads the untouched full-precision table
    gather = next(n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in inits)
    table = numpy_helper.to_array(inits[gather.input[0]])
    assert np.array_equal(table, source.get_input_embeddings().weight.detach().numpy())
    assert cfg["lm_head"]["tied"] is (kind == "llama3") and cfg["lm_head"]["bits"] == 4
    assert cfg["validation"]["passed"] and cfg["validation"]["max_abs_logit_diff"] <= cfg["validation"]["limit"]
    # decoder-linear bits are the method's; all parameters count the tied table once, both stored copies in bits
    bits, plain_bits = cfg["bits_per_param"], plain_cfg["bits_per_param"]
    assert bits["decoder_linears"] == plain_bits["decoder_linears"] and bits["params_all"] == plain_bits["params_all"]
    table_bits = head.N * head.K * 32
    head_bits = sum(head.stored_bits().values())
    delta = (head_bits - (0 if kind == "llama3" else table_bits)) / bits["params_all"]
    assert bits["all"] == pytest.approx(plain_bits["all"] + delta)


def test_folder_back_in_pytorch_keeps_the_embedding(tiny_export):
    """`eval --backend torch` rebuilds the fake-quant model: the quantized head no longer overwrites a tied table."""
    from qcompiler.runtime.evaluate import torch_model_from_folder
    from tests.helpers import tiny_model

    folder = tiny_export("llama3", "rtn", *RTN, *HEAD)
    model, _ = torch_model_from_folder(folder)
    source = tiny_model("llama3")
    assert torch.equal(model.get_input_embeddings().weight, source.get_input_embeddings().weight)
    assert not torch.equal(model.lm_head.weight, source.lm_head.weight)


def test_lm_head_errors(tiny_dirs, tmp_path, capsys):
    from tests.helpers import run_cli

    code, _, err = run_cli(capsys, "export", tiny_dirs("llama"), "--lm-head", "rtn", "--lm-head-bits", "8",
                           "-o", tmp_path / "a", "-q")
    assert code != 0 and "bits" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "export", tiny_dirs("llama"), "--method", "affinequant", "--lm-head", "rtn",
                           "-o", tmp_path / "b", "-q")
    assert code != 0 and "--lm-head is not supported" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
