"""`--lm-head rtn|gptq` (qcompiler/quantize/lm_head.py): the output projection becomes one more SpQRMatMul, validated like
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

from tests.helpers import VOCAB

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

    for bits in (2, 3, 4, 8):
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

    code, _, err = run_cli(capsys, "export", tiny_dirs("llama"), "--lm-head", "rtn", "--lm-head-bits", "6",
                           "-o", tmp_path / "a", "-q")
    assert code != 0 and "bits" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "export", tiny_dirs("llama"), "--method", "affinequant", "--lm-head", "rtn",
                           "-o", tmp_path / "b", "-q")
    assert code != 0 and "--lm-head is not supported" in err
    code, _, err = run_cli(capsys, "export", tiny_dirs("llama"), "--lm-head", "gptq", "--lm-head-nsamples", "0",
                           "-o", tmp_path / "c", "-q")
    assert code != 0 and "--lm-head-nsamples" in err and len(err.strip().splitlines()) == 1
    assert not any((tmp_path / d).exists() for d in "abc")


def test_head_hessian_is_the_final_hidden_states():
    """`head_hessian` = 2/n Σ x xᵀ over the lm_head's inputs, which are the model's last hidden states (after the
    final norm), and the lm_head itself never runs."""
    from qcompiler.models.families import family_for
    from qcompiler.quantize.calibration import head_hessian
    from tests.helpers import tiny_model

    model = tiny_model("llama3")
    family = family_for(model.config)
    windows = [torch.randint(3, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(i))
               for i in range(3)]
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    H = head_hessian(model, family, windows, progress=False)
    handle.remove()
    assert not calls
    with torch.no_grad():
        x = torch.cat([model(w, output_hidden_states=True).hidden_states[-1][0] for w in windows])
    assert torch.allclose(H, 2 / len(windows) * x.T @ x, rtol=1e-4, atol=1e-5)
    assert torch.equal(H, H.T)


def test_gptq_lm_head_lowers_the_output_error():
    """GPTQ's objective on the lm_head, tr((Ŵ − W) H (Ŵ − W)ᵀ) over its calibration inputs, below RTN's at the same
    grid, bits and group size; the tied embedding reads the same decoded table."""
    from qcompiler.models.families import family_for
    from qcompiler.quantize.calibration import head_hessian
    from qcompiler.quantize.lm_head import LMHeadConfig, quantize_lm_head
    from tests.helpers import tiny_model

    windows = [torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    source = tiny_model("llama3")
    family = family_for(source.config)
    w = source.lm_head.weight.detach().clone()
    H = head_hessian(source, family, windows, progress=False)
    errors = {}
    for method in ("rtn", "gptq"):
        model = tiny_model("llama3")
        cfg = LMHeadConfig(method=method, bits=3, group_size=16, round_zero=True)
        result = quantize_lm_head(model, family, cfg, calibration=windows, progress=False)
        d = model.lm_head.weight.detach() - w
        errors[method] = float(torch.einsum("nk,kl,nl->", d, H, d))
        assert result.tied and torch.equal(model.get_input_embeddings().weight, model.lm_head.weight)
        assert np.array_equal(result.weight.dequantize(), model.lm_head.weight.detach().numpy())
        assert result.weight.perm is None  # act_order off: the gather can serve the tied table
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


def test_gptq_lm_head_export(tiny_dirs, tmp_path, text_file):
    """`--lm-head gptq` on an RTN decoder: calibrated from --calibration (the decoder's method needs none), the tied
    embedding served by SpQRGather, the folder validated, quant_config.json names the settings and the windows."""
    from qcompiler.cli import main

    out = tmp_path / "out"
    assert main(["export", str(tiny_dirs("llama3")), "--method", "rtn", *RTN, "--lm-head", "gptq",
                 "--lm-head-bits", "4", "--lm-head-group-size", "16", "--calibration", str(text_file), "--nsamples",
                 "3", "--seqlen", "32", "--lm-head-nsamples", "2", "-o", str(out), "-q"]) == 0
    cfg = json.loads((out / "quant_config.json").read_text())
    head = cfg["lm_head"]
    assert head["method"] == "gptq" and head["tied"] and head["embedding"] == "SpQRGather"
    assert head["hessian_windows"] == 2 and head["round_zero"] is False and head["loss"] > 0
    assert head["hessian_from"] == "a forward of the model"
    assert cfg["calibration"]["nsamples"] == 3 and cfg["validation"]["passed"]
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert [n.op_type for n in proto.graph.node if n.op_type == "SpQRGather"] == ["SpQRGather"]


@pytest.mark.parametrize("flags,expected", [
    (("--lm-head", "rtn"), ("rtn", 8, 128)),  # measured lossless (qcompiler/quantize/lm_head.py: DEFAULT_BITS)
    (("--lm-head", "gptq"), ("gptq", 4, 32)),
    (("--lm-head", "rtn", "--lm-head-bits", "4"), ("rtn", 4, 32)),  # the group follows the width given
    (("--lm-head", "gptq", "--lm-head-bits", "8"), ("gptq", 8, 128)),
    (("--lm-head", "rtn", "--lm-head-group-size", "64"), ("rtn", 8, 64)),
])
def test_lm_head_defaults_per_method(flags, expected):
    from qcompiler.cli import _lm_head_config, build_parser

    cfg = _lm_head_config(build_parser().parse_args(["export", "MODEL", "-o", "OUT", *flags]))
    assert (cfg.method, cfg.bits, cfg.group_size) == expected
    assert _lm_head_config(build_parser().parse_args(["export", "MODEL", "-o", "OUT", "--lm-head", "keep"])) is None


def test_lm_head_auto_is_the_methods_measured_default():
    """No --lm-head: `auto`, which the method resolves (Method.default_lm_head): the 8-bit rtn table for SpQR's 4-bit
    codes and --target-bits mixes (measured lossless), the table kept elsewhere (SpQR 3-bit, whose int8 default holds only
    without a quantized head; RTN / GPTQ; transform methods; fp16 graphs)."""
    from qcompiler import QCompilerError
    from qcompiler.cli import _lm_head_config, build_parser
    from qcompiler.quantize.methods import get_method

    auto = _lm_head_config(build_parser().parse_args(["export", "MODEL", "-o", "OUT"]))
    assert auto.method == "auto"
    spqr = get_method("spqr")
    head = auto.resolve_auto(spqr, spqr.Config(), dtype="fp32")
    assert (head.method, head.bits, head.group_size) == ("rtn", 8, 128)
    assert auto.resolve_auto(spqr, spqr.Config(), dtype="fp16") is None
    assert auto.resolve_auto(spqr, spqr.Config(**spqr.presets["sub4"]), dtype="fp32") is None
    head = auto.resolve_auto(spqr, spqr.Config(target_bits=3.0), dtype="fp32")  # mixes: lossless 8-bit table too
    assert (head.method, head.bits, head.group_size) == ("rtn", 8, 128)
    for name in ("rtn", "gptq", "none", "affinequant", "affinequant+spqr"):
        method = get_method(name)
        assert auto.resolve_auto(method, method.Config(), dtype="fp32") is None, name
    given = _lm_head_config(build_parser().parse_args(["export", "MODEL", "-o", "OUT", "--lm-head-bits", "4"]))
    assert given.resolve_auto(spqr, spqr.Config(), dtype="fp32").bits == 4  # the width given applies to auto's rtn
    rtn = get_method("rtn")
    with pytest.raises(QCompilerError, match="need --lm-head rtn or gptq"):
        given.resolve_auto(rtn, rtn.Config(), dtype="fp32")  # auto keeps RTN's head: the flag would be ignored
    with pytest.raises(QCompilerError, match="need --lm-head rtn or gptq"):
        _lm_head_config(build_parser().parse_args(["export", "MODEL", "-o", "OUT", "--lm-head", "keep",
                                                   "--lm-head-bits", "8"]))


def test_8bit_lm_head_export(tiny_export):
    """`--lm-head-bits 8`: byte codes (docs/spqr-format.md) through the CPU kernel's row path and SpQRGather's w8
    function; the decoded table is the 8-bit grid of the source (error of 255 steps, not more), validated in ORT."""
    from qcompiler.graph.format import DOMAIN, OP_TYPE
    from qcompiler.graph.onnx_op import weight_from_node
    from tests.helpers import tiny_model

    folder = tiny_export("llama3", "rtn", *RTN, "--lm-head", "rtn", "--lm-head-bits", "8", "--lm-head-group-size", "32")
    cfg = json.loads((folder / "quant_config.json").read_text())
    assert cfg["lm_head"]["bits"] == 8 and cfg["lm_head"]["embedding"] == "SpQRGather"
    assert cfg["validation"]["passed"]
    proto = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.name == "lm_head/SpQRMatMul" and n.domain == DOMAIN
                and n.op_type == OP_TYPE)
    head = weight_from_node(node, inits)
    w = tiny_model("llama3").lm_head.weight.detach().numpy()
    err = np.abs(head.dequantize() - w).max()
    assert head.bits == 8 and 0 < err <= np.abs(w).max() / 255 * 1.01
    assert [n.overload for n in proto.graph.node if n.op_type == "SpQRGather"] == ["w8"]
    assert cfg["lm_head"]["avg_bits"] == pytest.approx(8 + 32 / 32, abs=0.01)


def test_engine_head_hessian_equals_the_forward():
    """The block-sequential engine's `head_hessian` (final norm over the last layer's outputs, all windows) equals
    the Hessian a forward of the quantized model gives at the lm_head's input."""
    from qcompiler.models.families import family_for
    from qcompiler.quantize.calibration import head_hessian
    from qcompiler.quantize.methods.gptq import GPTQ, GPTQConfig
    from tests.helpers import tiny_model

    model = tiny_model("llama3")
    family = family_for(model.config)
    windows = [torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = GPTQ(GPTQConfig(bits=3, group_size=16)).quantize(model, family, calibration=windows, progress=False)
    assert result.head_windows == 3 and result.head_hessian.shape == (64, 64)
    H = head_hessian(model, family, windows, progress=False)  # after: the model is the quantized one
    assert torch.allclose(result.head_hessian, H, rtol=1e-4, atol=1e-5 * float(H.abs().max()))


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "mistral-swa", "phi3", "gemma2", "gemma3_text", "smollm3", "granite",
                                  "opt"])
def test_8bit_lm_head_on_every_family(kind, tiny_dirs, tmp_path):
    """The 8-bit table `--method spqr` (4-bit codes) now quantizes by default, on each family the tests build (llama
    and llama3 above): the export validates in ONNX Runtime against PyTorch (Gemma's scaled embedding and logit
    soft-capping, Granite's multipliers, OPT's project_out included), a tied table is stored once and served by
    SpQRGather, an untied one keeps the embedding's table."""
    from qcompiler.cli import main
    from tests.helpers import tiny_model

    out = tmp_path / "out"
    assert main(["export", str(tiny_dirs(kind)), "--method", "rtn", *RTN, "--lm-head", "rtn", "-o", str(out),
                 "-q"]) == 0
    cfg = json.loads((out / "quant_config.json").read_text())
    head = cfg["lm_head"]
    assert cfg["validation"]["passed"] and (head["bits"], head["group_size"]) == (8, 128)
    tied = bool(getattr(tiny_model(kind).config, "tie_word_embeddings", False))
    assert head["tied"] is tied and head["embedding"] == ("SpQRGather" if tied else "table")
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert [n.overload for n in proto.graph.node if n.op_type == "SpQRGather"] == (["w8"] if tied else [])
