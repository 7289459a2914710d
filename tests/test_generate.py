"""`qcompiler generate`: KV-cache decode through ONNX Runtime equals a PyTorch greedy decode, sampling options,
streaming and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompiler import QCompilerError
from qcompiler.cli import main
from qcompiler.runtime.generate import Generator, SamplingConfig, pick_token

PROMPT = "w5 w17 w3 w99 w42 w7"


@pytest.fixture(scope="module", params=["llama", "opt", "llama3", "qwen3", "mistral-swa", "qwen2-swa", "phi3", "gemma2",
                                               "gemma3_text", "smollm3", "granite"])
def exported(request, tiny_dirs, tiny_export):
    return request.param, tiny_dirs(request.param), tiny_export(request.param, "none")


def test_greedy_equals_pytorch_token_for_token(exported):
    from transformers import AutoModelForCausalLM

    _, src, out = exported
    gen = Generator(out, threads=1)
    ids = gen.encode(PROMPT)
    res = gen.generate(ids, max_new_tokens=12, stop_at_eos=False)
    model = AutoModelForCausalLM.from_pretrained(str(src), attn_implementation="eager").eval()
    seq = list(ids)
    with torch.no_grad():  # greedy by full forwards (no cache), the plainest reference
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    ref = seq[len(ids):]
    assert res.token_ids == ref
    assert res.prefill_s > 0 and res.decode_tokens_per_s > 0


def test_streamed_text_is_the_result_text(exported):
    _, _, out = exported
    gen = Generator(out, threads=1)
    parts: list[str] = []
    res = gen.generate(gen.encode(PROMPT), max_new_tokens=8, stop_at_eos=False, on_text=parts.append)
    assert "".join(parts) == res.text and len(res.token_ids) == 8


def test_sampling_is_seeded_and_top_k_1_is_greedy(exported):
    _, _, out = exported
    gen = Generator(out, threads=1)
    ids = gen.encode(PROMPT)
    a = gen.generate(ids, max_new_tokens=10, sampling=SamplingConfig(temperature=1.5, seed=3), stop_at_eos=False)
    b = gen.generate(ids, max_new_tokens=10, sampling=SamplingConfig(temperature=1.5, seed=3), stop_at_eos=False)
    greedy = gen.generate(ids, max_new_tokens=10, stop_at_eos=False)
    top1 = gen.generate(ids, max_new_tokens=10, sampling=SamplingConfig(temperature=1.5, top_k=1, seed=4),
                        stop_at_eos=False)
    other = gen.generate(ids, max_new_tokens=10, sampling=SamplingConfig(temperature=1.5, seed=5), stop_at_eos=False)
    assert a.token_ids == b.token_ids
    assert top1.token_ids == greedy.token_ids
    # sampling samples: at temperature 1.5 over the tiny model's flat logits, 10 tokens differ from greedy and
    # between seeds (a sampler that ignored the temperature, or the seed, would return the greedy tokens)
    assert a.token_ids != greedy.token_ids and other.token_ids != greedy.token_ids and other.token_ids != a.token_ids


def test_pick_token_filters():
    logits = np.array([0.0, 5.0, 4.9, -3.0, 1.0], np.float32)
    rng = np.random.default_rng(0)
    assert pick_token(logits, SamplingConfig(), rng) == 1
    picks = {pick_token(logits, SamplingConfig(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert picks == {1, 2}
    picks = {pick_token(logits, SamplingConfig(temperature=1.0, top_p=0.3), rng) for _ in range(50)}
    assert picks == {1}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_pick_token_samples_softmax_over_temperature(temperature):
    """Draw frequencies follow softmax(logits / T): 4000 draws of a fixed-seed sampler, each frequency within 0.03 of
    its probability (4.5 standard deviations at p = 0.5), and different temperatures give different frequencies."""
    logits = np.array([2.0, 1.0, 0.0, -1.0], np.float32)
    rng = np.random.default_rng(7)
    draws = np.array([pick_token(logits, SamplingConfig(temperature=temperature), rng) for _ in range(4000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    p = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    assert np.abs(freq - p).max() < 0.03, (freq, p)


def test_cli_generate_prints_text_and_speed(exported, capsys):
    _, _, out = exported
    assert main(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "5", "--ignore-eos",
                 "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(PROMPT)
    assert "5 new tokens" in captured.err and "tok/s decode" in captured.err


def test_errors(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a `qcompiler export` output folder" in capsys.readouterr().err
    with pytest.raises(QCompilerError, match="top-p"):
        SamplingConfig(top_p=0.0)
