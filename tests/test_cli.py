"""`qcompiler` CLI end to end on tiny random models, and its behaviour on bad input."""

from __future__ import annotations

import json
import re

import onnx
import pytest

from tests.helpers import assert_no_output as _assert_no_output
from tests.helpers import one_error_line as _one_error_line
from tests.helpers import run_cli as _run
from qcompiler.cli import main
from qcompiler.graph.format import DOMAIN, OP_TYPE
from qcompiler.graph.onnx_op import node_parts


@pytest.mark.parametrize("kind, method", [("llama", "rtn"), ("opt", "rtn"), ("llama", "none")])
def test_export_then_eval_ort_equals_torch(kind, method, tiny_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    flags = ("--bits", "3", "--group-size", "16") if method == "rtn" else ()
    code, _, err = _run(capsys, "export", tiny_dirs(kind), "--method", method, *flags, "-o", out, "-q")
    assert code == 0, err
    for name in ("model.onnx", "quant_config.json", "manifest.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    model = onnx.load(out / "model.onnx", load_external_data=False)
    ops = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]
    cfg = json.loads((out / "quant_config.json").read_text())
    assert cfg["method"] == method
    if method == "rtn":
        # every linear (OPT 6 per layer, LLaMA 7) in one node with its siblings: q/k/v (and LLaMA's gate/up) share one
        assert sum(len(node_parts(n)) for n in ops) == (12 if kind == "opt" else 14) and len(ops) == 8
        assert not any(n.op_type in ("MatMul", "Gemm") and "layers" in n.name for n in model.graph.node)
        assert cfg["config"]["bits"] == 3 and cfg["config"]["group_size"] == 16
        assert 3 < cfg["avg_bits"] < 6  # 3-bit codes + fp16 scale and zero per 16 weights = 5 bits
    else:
        assert ops == [] and cfg["avg_bits"] == 32

    ppl = {}
    for backend in ("ort", "torch"):
        code, stdout, err = _run(capsys, "eval", out, "--dataset", text_file, "--seqlen", 64, "--max-windows", 4,
                                 "--backend", backend, "-q")
        assert code == 0, err
        ppl[backend] = float(re.search(r":\s*([0-9.]+)\s*$", stdout.strip()).group(1))
    # random weights over a 128-word vocabulary: perplexity near the vocabulary size, far from 1
    assert 20 < ppl["torch"] < 1000
    assert ppl["ort"] == pytest.approx(ppl["torch"], rel=1e-4)


def test_missing_model_path(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", tmp_path / "no-such-model", "-o", out)
    assert code != 0
    assert "not found" in _one_error_line(err)
    _assert_no_output(out)


def test_unknown_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(src)
    capsys.readouterr()  # drop the save's own progress output
    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", src, "-o", out)
    assert code != 0
    line = _one_error_line(err)
    assert "gpt2" in line and "llama" in line  # names what it got and what is supported
    _assert_no_output(out)


@pytest.mark.parametrize("flags, words", [
    (("--bits", "5"), ("bits", "5")),
    (("--group-size", "0"), ("group", "0")),
    (("--method", "nosuch"), ("nosuch", "rtn")),
    (("--preset", "sub4"), ("rtn", "sub4", "presets: none")),
    (("--method", "spqr", "--preset", "bogus"), ("bogus", "near-lossless", "sub4")),
])
def test_bad_method_options(flags, words, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", tiny_dirs("llama"), "-o", out, *flags)
    assert code != 0
    line = _one_error_line(err)
    for w in words:
        assert w in line, line
    _assert_no_output(out)


def test_existing_output_needs_force(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, _, err = _run(capsys, "export", tiny_dirs("llama"), "-o", out)
    assert code != 0
    assert "--force" in _one_error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # untouched


def test_failed_export_leaves_nothing(tiny_dirs, tmp_path, capsys, monkeypatch):
    """A failure after files started being written (here: the validation step) removes the staging folder."""
    import qcompiler.validate as validate

    def boom(*a, **k):
        raise validate.QCompilerError("validation failed (injected)")

    monkeypatch.setattr(validate, "validate_logits", boom)
    src = tiny_dirs("llama")
    capsys.readouterr()
    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", src, "-o", out, "-q")
    assert code != 0
    assert "injected" in _one_error_line(err)
    _assert_no_output(out)
    assert list(tmp_path.iterdir()) == [], "staging folder left behind"


def test_eval_on_non_export_folder(tmp_path, capsys):
    code, _, err = _run(capsys, "eval", tmp_path)
    assert code != 0
    assert "not an exported folder" in _one_error_line(err)


def test_preset_expands_to_options_and_flags_override(monkeypatch, tiny_dirs, text_file, tmp_path):
    seen = {}

    def fake_export(model, **kw):
        seen.update(kw["method_options"])

    monkeypatch.setattr("qcompiler.pipeline.export", fake_export)
    out = tmp_path / "out"
    assert main(["export", str(tiny_dirs("llama")), "-o", str(out), "--method", "spqr", "--preset", "sub4",
                 "--outlier-threshold", "0.5", "--calibration", str(text_file)]) == 0
    assert seen == {"bits": 3, "stat_group_size": 32, "outlier_threshold": 0.5}
    from qcompiler.quantize.methods.spqr import SpQRConfig
    SpQRConfig(**seen)  # a valid config


@pytest.mark.parametrize("diff,ok", [(3.9e-3, True), (4.1e-3, False)])
def test_validation_tolerance_scales_with_logits(tiny_dirs, tmp_path, capsys, monkeypatch, diff, ok):
    """Validation accepts |Δlogit| ≤ atol + rtol · max|logit| (here 1e-3 + 1e-4 · 30 = 4e-3) and records it."""
    import qcompiler.validate as validate

    monkeypatch.setattr(validate, "validate_logits", lambda *a, **k: (diff, 30.0))
    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", tiny_dirs("llama"), "-o", out, "-q")
    if ok:
        assert code == 0, err
        v = json.loads((out / "quant_config.json").read_text())["validation"]
        assert v["max_abs_logit_diff"] == diff and v["limit"] == pytest.approx(4e-3)
    else:
        assert code != 0 and "--rtol" in _one_error_line(err)
        _assert_no_output(out)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_fp16_export(kind, tiny_export):
    # the graph computes in fp16 (inputs/outputs, KV cache, unquantized weights); validated against the fp32
    # PyTorch model within the fp16 tolerance; generation runs on it
    from qcompiler.runtime.generate import Generator

    folder = tiny_export(kind, "rtn", "--bits", "4", "--group-size", "16", "--dtype", "fp16")
    cfg = json.loads((folder / "quant_config.json").read_text())
    assert cfg["dtype"] == "float16"
    v = cfg["validation"]
    assert (v["atol"], v["rtol"]) == (0.05, 0.01) and v["max_abs_logit_diff"] <= 0.01 * max(v["max_abs_logit"], 1)
    model = onnx.load(str(folder / "model.onnx"))
    types = {i.name: i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]}
    assert types["logits"] == onnx.TensorProto.FLOAT16 and types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
    fp32 = Generator(tiny_export(kind, "rtn", "--bits", "4", "--group-size", "16"))
    prompt = [5, 17, 3, 99, 42, 8]
    got = Generator(folder).generate(prompt, max_new_tokens=6, stop_at_eos=False).token_ids
    assert len(got) == 6
    assert got[0] == fp32.generate(prompt, max_new_tokens=1, stop_at_eos=False).token_ids[0]


def test_fp16_with_transforms_is_refused(tiny_dirs, text_file, tmp_path, capsys):
    code, _, err = _run(capsys, "export", tiny_dirs("llama"), "--method", "affinequant", "--bits", "4",
                        "--epochs", "0", "--calibration", text_file, "--nsamples", 2, "--seqlen", 32,
                        "--dtype", "fp16", "-o", tmp_path / "out", "-q")
    assert code != 0 and "--dtype fp16 is not supported with transform methods" in _one_error_line(err)


def test_failed_validation_keeps_the_export_aside(tiny_dirs, tmp_path, capsys, monkeypatch):
    # hours of calibration must not be thrown away by a validation failure: OUT is not written (it did not pass),
    # the complete export is kept in OUT.rejected with the measured difference
    import qcompiler.validate as validate

    monkeypatch.setattr(validate, "validate_logits", lambda *a, **k: (1.0, 10.0))
    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", tiny_dirs("llama"), "-o", out, "--method", "rtn", "-q")
    assert code != 0
    line = _one_error_line(err)
    assert "validation failed: ONNX Runtime logits differ from PyTorch by 1" in line and "out.rejected" in line
    _assert_no_output(out)
    kept = tmp_path / "out.rejected"
    cfg = json.loads((kept / "quant_config.json").read_text())
    assert cfg["validation"]["passed"] is False and cfg["validation"]["max_abs_logit_diff"] == 1.0
    assert (kept / "model.onnx").is_file() and not list(tmp_path.glob(".out.tmp-*"))


def test_transform_methods_get_a_wider_relative_tolerance(tiny_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", tiny_dirs("llama"), "--method", "affinequant", "--bits", "4",
                        "--epochs", "0", "--calibration", text_file, "--nsamples", 2, "--seqlen", 32, "-o", out, "-q")
    assert code == 0, err
    assert json.loads((out / "quant_config.json").read_text())["validation"]["rtol"] == 1e-3


@pytest.mark.parametrize("command", [[], ["export"], ["eval"], ["generate"], ["inspect"]])
def test_help_of_every_command_prints(command, capsys):
    # argparse formats each help string with %-substitution: a bare "%" in one (e.g. "0.5 %, else") crashed
    # `qcompiler export --help` with a ValueError instead of printing it
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and (not command or "--" in out)
