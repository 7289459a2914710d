"""bench/decode.py on a tiny export: the KV-cache decode loop produces what a full-sequence forward predicts, and the
table has one row per model."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import load_bench_script

@pytest.fixture(scope="module")
def decode():
    with load_bench_script("decode") as module:
        yield module

@pytest.fixture(scope="module")
def exported(tiny_export):
    return tiny_export("llama", "rtn", "--bits", "3", "--group-size", "16")

def test_kv_cache_decode_matches_full_forward(decode, exported):
    model = decode.Model(exported, threads=1, prompt_tokens=12)
    _, _, tokens = model.round(6)
    assert len(model.prompt_ids) == 12 and len(tokens) == 6
    # Greedy step i must be the argmax at the last position of one forward over prompt + tokens[:i].
    gen = model.gen
    for i in range(len(tokens)):
        ids = np.asarray([model.prompt_ids + tokens[:i]], np.int64)
        empty = [np.zeros((1, gen.num_kv_heads, 0, gen.head_dim), gen.past_dtype) for _ in gen.past_names]
        logits = gen.session.run(gen.output_names[:1], gen._feeds(ids, empty, 0))[0]
        assert int(logits[0, -1].argmax()) == tokens[i], f"step {i}"

def test_table_has_one_row_per_model(decode, exported, tmp_path):
    out = tmp_path / "decode.md"
    assert decode.main([str(exported), str(exported), "--rounds", "1", "--new-tokens", "3", "--prompt-tokens", "5",
                        "--threads", "1", "--step-runs", "2", "-o", str(out)]) == 0
    text = out.read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith(f"| {exported.name} |")]
    assert len(rows) == 4 and "1.00×" in rows[0]  # the tokens/s table, then the single-step table
    assert "One decode step (position 5), 2 alternations" in text and rows[2].endswith("| 1.000 |")
    out2 = tmp_path / "no-steps.md"
    assert decode.main([str(exported), "--rounds", "1", "--new-tokens", "2", "--prompt-tokens", "5", "--threads", "1",
                        "--step-runs", "0", "-o", str(out2)]) == 0
    assert "One decode step" not in out2.read_text()


def test_step_feeds_are_the_step_after_the_prompt(decode, exported):
    model = decode.Model(exported, threads=1, prompt_tokens=7)
    _, _, tokens = model.round(3)
    feeds = model.step_feeds()
    assert feeds["position_ids"].tolist() == [[7]] and feeds["input_ids"].tolist() == [[tokens[0]]]
    logits = model.gen.session.run(model.gen.output_names[:1], feeds)[0]
    assert int(logits[0, -1].argmax()) == tokens[1]  # the greedy loop's second token

def test_missing_folder_is_a_clear_error(decode, tmp_path, capsys):
    assert decode.main([str(tmp_path / "nope")]) == 2
    assert "no exported model" in capsys.readouterr().err
