"""Text → token windows: JSON rows protocol, eval window counting, calibration determinism, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.helpers import SHARED_DATA, make_tokenizer

from qcompiler import QCompilerError
from qcompiler.data import (
    CALIBRATION_FILE,
    DATA_ENV,
    EVAL_FILE,
    calibration_windows,
    data_dirs,
    default_data_file,
    eval_windows,
    load_text,
    load_text_tokens,
    missing_data_hint,
    sample_windows,
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_json_rows_joined(tmp_path, tok):
    p = tmp_path / "rows.json"
    p.write_text(json.dumps(["w1 w2", "", "w3"]))
    assert load_text(p) == "w1 w2\n\n\n\nw3"
    ids = load_text_tokens(p, tok)
    assert ids.dtype == torch.long and ids.shape == (1, 3)
    assert ids[0].tolist() == tok("w1 w2 w3").input_ids


def test_bad_json(tmp_path):
    p = tmp_path / "rows.json"
    p.write_text(json.dumps({"a": 1}))
    with pytest.raises(QCompilerError, match="JSON list of strings"):
        load_text(p)


def test_eval_window_counting():
    tokens = torch.arange(1000).reshape(1, -1)
    wins = eval_windows(tokens, 128)
    assert len(wins) == 1000 // 128 == 7
    assert all(w.shape == (1, 128) for w in wins)
    assert torch.equal(torch.cat(wins, dim=1), tokens[:, : 7 * 128])  # non-overlapping, in order
    assert len(eval_windows(tokens, 128, max_windows=3)) == 3
    assert len(eval_windows(tokens, 128, max_windows=100)) == 7
    assert len(eval_windows(tokens, 1000)) == 1


def test_eval_too_short():
    with pytest.raises(QCompilerError, match="too short: 100 tokens"):
        eval_windows(torch.arange(100).reshape(1, -1), 128)


def test_calibration_deterministic(text_file, tok):
    a = calibration_windows(text_file, tok, nsamples=8, seqlen=64, seed=0)
    b = calibration_windows(text_file, tok, nsamples=8, seqlen=64, seed=0)
    c = calibration_windows(text_file, tok, nsamples=8, seqlen=64, seed=1)
    assert len(a) == 8 and all(w.shape == (1, 64) and w.dtype == torch.long for w in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    tokens = load_text_tokens(text_file, tok)
    flat = tokens[0].tolist()
    for w in a:  # each window is a contiguous slice of the text
        seq = w[0].tolist()
        assert any(flat[i : i + 64] == seq for i in range(len(flat) - 63))


def test_sample_windows_start_range():
    tokens = torch.arange(65).reshape(1, -1)  # exactly seqlen + 1 tokens: only start 0 is valid
    wins = sample_windows(tokens, nsamples=5, seqlen=64, seed=3)
    assert all(torch.equal(w, tokens[:, :64]) for w in wins)


def test_calibration_too_short(tmp_path, tok):
    p = tmp_path / "short.txt"
    p.write_text("w1 w2 w3 w4")
    with pytest.raises(QCompilerError, match=r"too short for calibration: 4 tokens"):
        calibration_windows(p, tok, nsamples=2, seqlen=16)


def test_missing_file(tok):
    with pytest.raises(QCompilerError, match="text file not found: /nonexistent/x.txt"):
        load_text_tokens("/nonexistent/x.txt", tok)


def test_hub_fallback_without_datasets(tok, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local file named "wikitext2"
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(QCompilerError, match="pass a path"):
        load_text_tokens("wikitext2", tok)


# ---------------------------------------------------------------------------------------------- default data files
def _data_tree(root, names=(EVAL_FILE, CALIBRATION_FILE)):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    return root


def test_default_data_from_environment(tmp_path, monkeypatch):
    data = _data_tree(tmp_path / "mydata")
    monkeypatch.setenv(DATA_ENV, str(data))
    assert data_dirs() == [data]  # alone: no silent fallback to another copy
    assert default_data_file(EVAL_FILE) == data / EVAL_FILE
    (data / CALIBRATION_FILE).unlink()
    assert default_data_file(CALIBRATION_FILE) is None
    assert str(data / CALIBRATION_FILE) in missing_data_hint(CALIBRATION_FILE)
    monkeypatch.setenv(DATA_ENV, str(data / EVAL_FILE))  # the file, not its folder
    with pytest.raises(QCompilerError, match="is a file; it names the data folder"):
        data_dirs()


def test_default_data_from_working_directory_then_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    work = tmp_path / "proj" / "repo"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    checkout = Path(__file__).resolve().parents[2] / "shared" / "data"
    assert data_dirs()[-1] == checkout  # ../shared/data beside the checkout, after the working directory's
    shared = _data_tree(tmp_path / "proj" / "shared" / "data", names=(EVAL_FILE,))
    assert data_dirs()[0] == shared
    assert default_data_file(EVAL_FILE) == shared / EVAL_FILE  # the working directory's copy first
    if (checkout / CALIBRATION_FILE).is_file():  # absent from ./../shared/data: found beside the checkout
        assert default_data_file(CALIBRATION_FILE) == checkout / CALIBRATION_FILE


def test_cli_fails_fast_naming_where_it_looked(tmp_path, monkeypatch, capsys):
    from tests.helpers import one_error_line, run_cli

    monkeypatch.setenv(DATA_ENV, str(tmp_path / "empty"))
    # before loading the model (this one does not exist: its error would come first otherwise)
    code, _, err = run_cli(capsys, "export", tmp_path / "no-model", "--method", "spqr", "-o", tmp_path / "o")
    line = one_error_line(err)
    assert code == 2 and "needs calibration text" in line and str(tmp_path / "empty" / CALIBRATION_FILE) in line
    export = tmp_path / "export"  # an export folder as far as the check before the data goes
    export.mkdir()
    (export / "model.onnx").write_bytes(b"")
    (export / "quant_config.json").write_text("{}")
    code, _, err = run_cli(capsys, "eval", export)
    line = one_error_line(err)
    assert code == 2 and "no evaluation text" in line and str(tmp_path / "empty" / EVAL_FILE) in line


@pytest.mark.skipif(not (SHARED_DATA / "wikitext2" / "test_rows.json").exists(), reason="shared data absent")
def test_shared_test_rows_protocol():
    rows = json.loads((SHARED_DATA / "wikitext2" / "test_rows.json").read_text())
    assert len(rows) == 4358
    assert load_text(SHARED_DATA / "wikitext2" / "test_rows.json") == "\n\n".join(rows)


# ---------------------------------------------------------------------------------------------- perplexity
def test_perplexity_torch_matches_manual(text_file, tok):
    from tests.helpers import tiny_model

    from qcompiler.runtime.evaluate import perplexity_torch

    model = tiny_model("llama")
    wins = eval_windows(load_text_tokens(text_file, tok), 32, max_windows=3)
    res = perplexity_torch(model, wins, progress=False)
    with torch.no_grad():
        losses = [model(w, labels=w).loss for w in wins]  # HF mean loss per window
    assert res.windows == 3 and res.tokens == 3 * 31
    assert res.window_nll == pytest.approx([float(x) for x in losses], rel=1e-5)
    assert res.ppl == pytest.approx(float(torch.exp(torch.stack(losses).mean())), rel=1e-5)


def _table_model(table, num_layers, kv_heads, head_dim, past_type):
    """ONNX model with the exported interface whose logits are a lookup `table[input_ids]`."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    B, S, P = "batch", "seq", "past"
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, S]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [B, S]),
    ] + [
        helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", past_type, [B, kv_heads, P, head_dim])
        for i in range(num_layers) for kv in ("key", "value")
    ]
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)]
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [B, S, table.shape[1]])]
    graph = helper.make_graph(nodes, "t", inputs, out, [numpy_helper.from_array(table.astype(np.float32), "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("past_type", ["float", "float16"])
def test_perplexity_ort_feeds_and_matches_torch(past_type):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto

    from qcompiler.runtime.evaluate import perplexity_ort, window_nll

    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 50)).astype(np.float32)
    ptype = TensorProto.FLOAT if past_type == "float" else TensorProto.FLOAT16
    proto = _table_model(table, 2, 2, 8, ptype)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    wins = eval_windows(torch.from_numpy(rng.integers(0, 50, size=(1, 100))), 20)
    res = perplexity_ort(sess, wins, num_layers=2, num_kv_heads=2, head_dim=8, progress=False)
    nll = sum(window_nll(torch.from_numpy(table)[w], w)[0] for w in wins)
    assert res.tokens == 5 * 19 and res.nll == pytest.approx(nll, rel=1e-6)
    with pytest.raises(QCompilerError, match="lacks expected inputs: past_key_values.2.key"):
        perplexity_ort(sess, wins, num_layers=3, num_kv_heads=2, head_dim=8, progress=False)
