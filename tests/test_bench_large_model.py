"""bench/large_model.py end to end on a small config (the real run is > 2 GB): source → export → reload, and the
table it writes; its sharded source, its per-stage parser and its memory cgroup."""

from __future__ import annotations

import json
import os

import pytest


def test_large_model_script_small_config(tmp_path):
    out = tmp_path / "large.md"
    from bench import large_model as large

    code = large.main(["--vocab", "600", "--hidden", "64", "--intermediate", "96", "--layers", "1",
                       "--shard-gb", "0.0001", "--keep", str(tmp_path / "work"), "-o", str(out)])
    assert code == 0
    text = out.read_text()
    for row in ("| parameters |", "| export |", "| emitted |", "| validation (in the export) |", "| reload in ORT |"):
        assert row in text, text
    assert "7 quantized linears" in text and "peak RSS" in text
    assert (tmp_path / "work" / "out" / "model.onnx.data").is_file()
    # the per-stage table parsed from the export's own summary
    for stage in ("load", "quantize", "export", "passes", "emit"):
        assert f"| {stage} | " in text, text


def test_make_source_writes_shards_transformers_loads(tmp_path):
    """The streamed source is a sharded checkpoint with an index that transformers loads, with the asked dtype,
    head counts and untied embeddings."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.large_model import make_source

    src = tmp_path / "src"
    params = make_source(src, vocab=300, hidden=64, layers=2, intermediate=96, seed=0, heads=4, kv_heads=2,
                         dtype="bfloat16", shard_gb=0.00005)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    assert sorted(p.name for p in src.glob("*.safetensors")) == files
    model = AutoModelForCausalLM.from_pretrained(src)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    w = model.model.layers[1].mlp.down_proj.weight
    assert w.dtype == torch.bfloat16 and 0.01 < float(w.float().std()) < 0.03
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))


def test_stage_lines_parses_the_export_summary():
    from bench.large_model import stage_lines

    text = ("wrote out: 7 SpQRMatMul layers\n"
            "time: load 1.5s, quantize 20.0s, lm_head 3.0s, export 4.25s\n"
            "peak memory (process high-water mark after each stage): load 1.10 GB, quantize 2.00 GB, export 3.50 GB\n"
            "peak anonymous memory (the weights are file pages: --offload-weights): load 0.20 GB, export 0.90 GB\n")
    assert stage_lines(text) == {
        "load": {"seconds": 1.5, "peak_rss_gb": 1.1, "anon_gb": 0.2},
        "quantize": {"seconds": 20.0, "peak_rss_gb": 2.0},
        "lm_head": {"seconds": 3.0},
        "export": {"seconds": 4.25, "peak_rss_gb": 3.5, "anon_gb": 0.9},
    }


def test_memory_cap_kills_a_child_past_its_limit(tmp_path):
    """A child that allocates past the cap is killed; one under it finishes; the cgroup is removed afterwards."""
    import sys

    from bench.large_model import MemoryCap, run_child

    try:
        cap = MemoryCap(256 * 2**20)
    except SystemExit as e:
        pytest.skip(f"no writable memory cgroup here: {e}")
    try:
        grow = "import numpy as np; a = np.ones({n} * 2**20 // 8); print(a.sum())"
        ok = run_child([sys.executable, "-c", grow.format(n=64)], tmp_path / "ok.log", cap)
        assert ok["code"] == 0, (tmp_path / "ok.log").read_text()
        killed = run_child([sys.executable, "-c", grow.format(n=1024)], tmp_path / "big.log", cap)
        assert killed["code"] == -9
        assert killed["cgroup_peak"] is None or killed["cgroup_peak"] <= cap.limit
    finally:
        cap.close()
    assert not cap.path.exists()
    assert os.path.isdir(cap.path.parent)
