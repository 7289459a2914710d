"""bench/decode.py on a tiny export: the KV-cache decode loop produces what a full-sequence forward predicts, and the
table has one row per model."""

from __future__ import annotations

import sys

import numpy as np
import pytest

@pytest.fixture(scope="module")
def decode():
    from bench import decode

    return decode

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

def _ratio_matches(ratio: float, pair: list[float], half_unit: float, ratio_half_unit: float) -> bool:
    """`ratio` is pair[1] / pair[0], up to the rounding of the printed figures (± half_unit each, the ratio's own
    ± ratio_half_unit)."""
    exact = pair[1] / pair[0]
    return abs(ratio - exact) <= exact * (half_unit / pair[0] + half_unit / pair[1]) + ratio_half_unit


def test_table_has_one_row_per_model(decode, exported, tiny_export, tmp_path):
    """Two different exports (fp32 first, then RTN 3-bit): one row each in both tables, named after its folder and
    method, and each "vs first" ratio is the row's own figure over the first row's."""
    fp32 = tiny_export("llama", "none")
    out = tmp_path / "decode.md"
    assert decode.main([str(fp32), str(exported), "--rounds", "1", "--new-tokens", "3", "--prompt-tokens", "5",
                        "--threads", "1", "--step-runs", "2", "-o", str(out)]) == 0
    text = out.read_text()
    assert "One decode step (position 5), 2 alternations" in text
    speed = [ln.split(" | ") for ln in text.splitlines() if ln.startswith("| ") and ln.endswith("|") and "×" in ln]
    names = decode.labels([fp32, exported])  # both folders are named "out": labelled by their parents
    assert names == [f"{fp32.parent.name}/out", f"{exported.parent.name}/out"]
    steps = text.split("One decode step")[1]
    step = [ln.split(" | ") for ln in steps.splitlines() if ln.startswith(("| " + names[0] + " |",
                                                                            "| " + names[1] + " |"))]
    assert [r[0].strip("| ") for r in speed] == names
    assert [r[1] for r in speed] == ["none", "rtn"] and speed[1][2] != "32"  # RTN's avg bits, fp32's 32
    tok_s = [float(r[4]) for r in speed]
    assert speed[0][5] == "1.00×" and _ratio_matches(float(speed[1][5].rstrip("×")), tok_s, 0.05, 0.005)
    ms = [float(r[1]) for r in step]
    assert len(ms) == 2 and step[0][3].rstrip(" |") == "1.000"
    assert _ratio_matches(float(step[1][3].rstrip(" |")), ms, 0.005, 0.0005)
    out2 = tmp_path / "no-steps.md"
    assert decode.main([str(exported), "--rounds", "1", "--new-tokens", "2", "--prompt-tokens", "5", "--threads", "1",
                        "--step-runs", "0", "-o", str(out2)]) == 0
    assert "One decode step" not in out2.read_text()


def test_the_same_folder_twice_is_an_error(decode, exported, capsys):
    assert decode.main([str(exported), str(exported), "--rounds", "1"]) == 2
    assert "given twice" in capsys.readouterr().err


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
