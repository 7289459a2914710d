"""genai_config.json (qcompiler/runtime/genai.py): onnxruntime-genai loads an exported folder unmodified and generates the
same tokens as `qcompiler generate`."""

from __future__ import annotations

import json

import numpy as np
import pytest

og = pytest.importorskip("onnxruntime_genai")


def _genai_greedy(folder, prompt: list[int], n: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(prompt, dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[len(prompt):]]


@pytest.mark.parametrize("flags", [(), ("--no-fallback",), ("--no-contrib-ops",)],
                         ids=["default", "no-fallback", "no-contrib-ops"])
def test_genai_generates_the_same_tokens(tiny_export, flags, monkeypatch, tmp_path):
    from qcompiler.runtime.generate import Generator

    folder = tiny_export("llama", "rtn", "--bits", "3", "--group-size", "16", *flags)
    cfg = json.loads((folder / "genai_config.json").read_text())
    # GroupQueryAttention writes into the one buffer onnxruntime-genai binds as past and present; the standard-op
    # graph concatenates
    assert cfg["model"]["type"] == "llama"
    assert cfg["search"]["past_present_share_buffer"] is ("--no-contrib-ops" not in flags)
    assert cfg["model"]["decoder"]["session_options"]["custom_ops_library"] == "libqcompiler_ops.so"
    assert cfg["model"]["decoder"]["num_key_value_heads"] == 2 and cfg["model"]["decoder"]["head_size"] == 16
    monkeypatch.chdir(tmp_path)  # the library path is relative to the folder, not to the working directory
    prompt = [5, 17, 3, 99, 42, 8]
    expected = Generator(folder).generate(prompt, max_new_tokens=10, stop_at_eos=False).token_ids
    # (--no-fallback: the model has no standard-op definition, so this only runs if genai loaded the library)
    assert _genai_greedy(folder, prompt, 10) == expected


def test_no_genai_config_for_families_genai_lacks(tiny_export):
    assert not (tiny_export("opt", "rtn", "--bits", "4", "--group-size", "32") / "genai_config.json").exists()
