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
                        "--threads", "1", "-o", str(out)]) == 0
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith(f"| {exported.name} |")]
    assert len(rows) == 2 and "1.00×" in rows[0]

def test_missing_folder_is_a_clear_error(decode, tmp_path, capsys):
    assert decode.main([str(tmp_path / "nope")]) == 2
    assert "no exported model" in capsys.readouterr().err
