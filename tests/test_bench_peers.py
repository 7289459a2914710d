"""bench/peers.py without the peers' binaries: llama-bench JSON parsing, the builder's config cleaning, `--ours`
parsing, row selection, medians/ratios and the rendered table."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from bench import peers

# Two tests of one `llama-bench -m X -p 64 -n 64 -t 2 -r 1 -o json` run (trimmed: fields the parser ignores dropped)
LLAMA_BENCH_JSON = """[
  {
    "build_commit": "0c1e570", "build_number": 1, "cpu_info": "Intel(R) Xeon(R) Processor", "gpu_info": "",
    "backends": "CPU", "model_filename": "build/peers/gguf/model-Q4_K_M.gguf", "model_type": "llama 256M Q4_K - Medium",
    "model_size": 105467904, "model_n_params": 134515008, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2,
    "type_k": "f16", "type_v": "f16", "n_prompt": 64, "n_gen": 0, "n_depth": 0,
    "test_time": "2026-12-06T11:16:51Z", "avg_ns": 152035000, "stddev_ns": 0, "avg_ts": 420.953,
    "stddev_ts": 0.000000, "samples_ns": [ 152035000 ], "samples_ts": [ 420.953 ]
  },
  {
    "build_commit": "0c1e570", "build_number": 1, "cpu_info": "Intel(R) Xeon(R) Processor", "gpu_info": "",
    "backends": "CPU", "model_filename": "build/peers/gguf/model-Q4_K_M.gguf", "model_type": "llama 256M Q4_K - Medium",
    "model_size": 105467904, "model_n_params": 134515008, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2,
    "type_k": "f16", "type_v": "f16", "n_prompt": 0, "n_gen": 64, "n_depth": 0,
    "test_time": "2026-12-06T11:16:52Z", "avg_ns": 1075210000, "stddev_ns": 0, "avg_ts": 59.5235,
    "stddev_ts": 0.000000, "samples_ns": [ 1075210000 ], "samples_ts": [ 59.5235 ]
  }
]"""


def test_parse_llama_bench_picks_prefill_and_decode():
    out = peers.parse_llama_bench(LLAMA_BENCH_JSON)
    assert out["prefill_tok_s"] == pytest.approx(420.953)
    assert out["decode_tok_s"] == pytest.approx(59.5235)
    assert out["build_commit"] == "0c1e570" and out["n_threads"] == 2
    assert out["type"] == "llama 256M Q4_K - Medium"


def test_parse_llama_bench_order_does_not_matter_and_missing_test_fails():
    tests = json.loads(LLAMA_BENCH_JSON)
    out = peers.parse_llama_bench(json.dumps(tests[::-1]))
    assert (out["prefill_tok_s"], out["decode_tok_s"]) == pytest.approx((420.953, 59.5235))
    with pytest.raises(peers.BenchError, match="lacks a decode test"):
        peers.parse_llama_bench(json.dumps(tests[:1]))
    with pytest.raises(peers.BenchError, match="not JSON"):
        peers.parse_llama_bench("| model | size |")


def test_clean_hf_config_adds_architectures_and_drops_gguf_quantization():
    cfg = {"model_type": "llama", "hidden_size": 576, "tie_word_embeddings": True,
           "quantization_config": {"quant_method": "gguf"}}
    out = peers.clean_hf_config(cfg)
    assert out["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in out
    assert out["hidden_size"] == 576 and out["tie_word_embeddings"] is True
    assert "quantization_config" in cfg and "architectures" not in cfg  # the input is left as it was
    assert peers.clean_hf_config({"architectures": ["Qwen2ForCausalLM"]})["architectures"] == ["Qwen2ForCausalLM"]


def test_store_tied_as_embedding_renames_lm_head(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    f = tmp_path / "model.safetensors"
    w = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    save_file({"lm_head.weight": w, "model.norm.weight": torch.ones(2)}, str(f), metadata={"format": "pt"})
    assert peers.store_tied_as_embedding(f) is True
    with safe_open(str(f), "pt") as s:
        assert sorted(s.keys()) == ["model.embed_tokens.weight", "model.norm.weight"]
        assert torch.equal(s.get_tensor("model.embed_tokens.weight"), w)
        assert s.metadata() == {"format": "pt"}
    assert peers.store_tied_as_embedding(f) is False  # nothing left to rename


def test_parse_ours():
    assert peers.parse_ours(["w4=build/peers/ours/spqr-w4", " fp32 = out/fp32 "]) == [
        ("w4", Path("build/peers/ours/spqr-w4")), ("fp32", Path("out/fp32"))]
    with pytest.raises(peers.BenchError, match="expected LABEL=FOLDER"):
        peers.parse_ours(["build/peers/ours/spqr-w4"])
    with pytest.raises(peers.BenchError, match="expected LABEL=FOLDER"):
        peers.parse_ours(["w4="])
    with pytest.raises(peers.BenchError, match="'w4' is given twice"):
        peers.parse_ours(["w4=a", "w4=b"])


def test_ours_flag_through_main_rejects_bad_value(capsys):
    assert peers.main(["--ours", "nolabel", "--skip-speed", "--skip-ppl"]) == 2
    assert "expected LABEL=FOLDER" in capsys.readouterr().err


def test_default_ours_and_selection(tmp_path):
    for name in ("fp32", "spqr-w3", "not-a-default"):
        (tmp_path / "ours" / name).mkdir(parents=True)
        (tmp_path / "ours" / name / "model.onnx").write_bytes(b"")
    (tmp_path / "ours" / "spqr-w4").mkdir()  # no model.onnx: not an export
    ours = peers.default_ours(tmp_path / "ours")  # every build of OURS_BUILDS, present or not (--prepare makes them)
    assert [label for label, _ in ours] == ["fp32", "spqr-w4-head4", "spqr-w3-head4", "spqr-w4", "spqr-w4-headg4",
                                            "spqr-w4-head8", "spqr-w3", "spqr-w4-head4-a4", "spqr-w3-head4-a4",
                                            "spqr-w4-a4", "spqr-w4-headg4-a4", "spqr-w4-head8-a4"]
    ours = [o for o in ours if o[0] in ("fp32", "spqr-w3")]
    rows = peers.all_peers(ours, tmp_path)
    labels = [r.label for r in rows]
    assert labels[:4] == ["ours-fp32", "ours-spqr-w3", "genai-int4-acc4", "genai-int4-acc0"]
    assert "llama.cpp-Q4_K_M" in labels and "llama.cpp-IQ4_XS" in labels
    assert [r.label for r in peers.select(rows, "ours,q4_k_m")] == ["ours-fp32", "ours-spqr-w3", "llama.cpp-Q4_K_M"]
    gguf = next(r for r in rows if r.label == "llama.cpp-Q3_K_M")
    assert gguf.model_file() == tmp_path / "gguf" / "model-Q3_K_M.gguf"
    with pytest.raises(peers.BenchError, match="no row matches nope"):
        peers.select(rows, "ours,nope")


def test_our_rows_per_driver(tmp_path):
    # --drivers qcompiler,genai: each folder of ours twice, the second run by onnxruntime-genai (label ...@genai),
    # the same folder and perplexity; the genai measurement registers this checkout's op library by absolute path.
    ours = [("spqr-w4", tmp_path / "ours" / "spqr-w4")]
    rows = peers.all_peers(ours, tmp_path, peers.parse_drivers("qcompiler,genai"))
    mine = [r for r in rows if r.kind == "ours"]
    assert [(r.label, r.driver) for r in mine] == [("ours-spqr-w4", "qcompiler"), ("ours-spqr-w4@genai", "genai")]
    assert mine[0].path == mine[1].path and "onnxruntime-genai" in mine[1].how
    assert [r.label for r in peers.select(rows, "ours")] == ["ours-spqr-w4", "ours-spqr-w4@genai"]
    assert [r.driver for r in peers.all_peers(ours, tmp_path) if r.kind == "ours"] == ["qcompiler"]
    for bad in ("", "genai,genai", "qcompiler,ort"):
        with pytest.raises(peers.BenchError, match="--drivers"):
            peers.parse_drivers(bad)
    lib = tmp_path / "libqcompiler_ops.so"
    assert peers.genai_session_overlay("ours", 2, lib) == {
        "model": {"decoder": {"session_options": {"intra_op_num_threads": 2, "custom_ops_library": str(lib)}}}}
    assert peers.genai_session_overlay("genai", 1, None) == {
        "model": {"decoder": {"session_options": {"intra_op_num_threads": 1}}}}


def test_median_and_ratio():
    assert peers.median([3.0, 1.0, 2.0, float("nan")]) == 2.0
    assert peers.median([4.0, 1.0]) == 2.5
    assert peers.median([]) is None
    assert peers.ratio(30.0, 20.0) == 1.5
    assert peers.ratio(30.0, None) is None and peers.ratio(None, 2.0) is None


def _run(decode: list[float], prefill: float = 100.0, mem: float = 50.0) -> list[dict]:
    return [{"prefill_tok_s": prefill, "decode_tok_s": d, "mem_mb": mem} for d in decode]


def test_render_table_medians_ratios_and_missing_rows():
    result = {
        "date": "2026-12-06", "command": ".venv/bin/python -m bench.peers --rounds 3", "source": "m.gguf",
        "threads": [1, 2], "rounds": 3, "prompt_tokens": 64, "new_tokens": 64,
        "environment": {"cpu": "Test CPU", "cpu_count": 2, "onnxruntime": "1.31.1", "onnxruntime_genai": "0.18.0",
                        "llamacpp": "0c1e570"},
        "protocol": {"windows": 40, "seqlen": 512, "windows_sha256": "abcdef0123456789"},
        "rows": [
            {"label": "ours-spqr-w4", "kind": "ours", "how": "ours", "bits_linears": 4.6251, "bits_all": 9.87,
             "file_mb": 150.04, "ppl": {"ppl": 17.5, "protocol": "ORT"},
             "speed": {"1": _run([30.0, 10.0, 20.0], mem=120.0), "2": _run([40.0, 40.0, 60.0], mem=130.0)}},
            {"label": "genai-int4-acc4", "kind": "genai", "how": "genai", "bits_linears": 5.0, "bits_all": 8.0,
             "file_mb": 100.0, "ppl": {"ppl": 18.0, "protocol": "ORT"},
             "speed": {"1": _run([15.0, 5.0, 10.0]), "2": _run([20.0, 20.0, 20.0])}},
            {"label": "llama.cpp-Q4_K_M", "kind": "llamacpp", "how": "q", "bits_linears": 4.9, "bits_all": 5.5,
             "file_mb": 105.5, "ppl": {"ppl": 17.9, "protocol": "PyTorch fp32 (transformers-dequantized GGUF weights)"},
             "speed": {"1": _run([40.0, 40.0, 40.0], mem=200.0), "2": _run([80.0, 80.0, 80.0], mem=210.0)}},
            {"label": "llama.cpp-IQ4_XS", "kind": "llamacpp", "how": "iq", "missing": "no model-IQ4_XS.gguf"},
        ],
        "notes": ["a run note"], "timings": {"perplexity": 12.3},
    }
    text = peers.render_table(result)
    assert "Test CPU" in text and "onnxruntime-genai 0.18.0" in text and "0c1e570" in text
    assert "`.venv/bin/python -m bench.peers --rounds 3`" in text and "40 windows × 512 tokens" in text
    header = next(ln for ln in text.splitlines() if ln.startswith("| model |"))
    cells = {ln.split(" | ")[0][2:]: [c.strip() for c in ln.strip("|").split("|")]
             for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith(("| model", "|---"))}
    assert len(header.strip("|").split("|")) == len(cells["ours-spqr-w4"]) == 13
    ours = cells["ours-spqr-w4"]
    assert ours[2] == "4.63; 9.87" and ours[3] == "150.0" and ours[4] == "17.500"
    assert ours[5:9] == ["100.0", "20.0", "100.0", "40.0"]  # medians of [30, 10, 20] and [40, 40, 60]
    assert ours[9] == "2.00×, 2.00×" and ours[10] == "0.50×, 0.50×"  # 20/10, 40/20; 20/40, 40/80
    # paired by round: t1 30/15, 10/5, 20/10 (the drift both rows saw cancels), t2 40/20, 40/20, 60/20
    assert ours[11] == "2.00× [2.00–2.00]; 2.00× [2.00–2.50]"
    assert cells["genai-int4-acc4"][11] == "1.00× [1.00–1.00]; 1.00× [1.00–1.00]"
    assert ours[12] == "130 ᴳ"  # max over its runs, ONNX growth
    assert cells["llama.cpp-Q4_K_M"][4] == "17.900 ⁽ᵗ⁾" and cells["llama.cpp-Q4_K_M"][12] == "210 ᴿ"
    assert cells["llama.cpp-Q4_K_M"][10] == "1.00×, 1.00×"
    assert cells["llama.cpp-IQ4_XS"][2] == "missing: no model-IQ4_XS.gguf" and len(cells["llama.cpp-IQ4_XS"]) == 13
    assert "- a run note" in text and "perplexity 12" in text


def test_ppl_cache_keys_on_mtime_and_windows(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    cache = peers.PplCache(tmp_path / "cache.json")
    cache.put(model, "sha1", {"ppl": 12.5})
    assert peers.PplCache(tmp_path / "cache.json").get(model, "sha1") == {"ppl": 12.5}
    assert cache.get(model, "sha2") is None
    import os

    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.get(model, "sha1") is None


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs GNU time")
def test_measure_llamacpp_retries_without_repack_after_sigill(tmp_path, monkeypatch):
    """A llama-bench that exits 132 (SIGILL) unless given `--repack 0`: one retry, flagged `repack: False`; any other
    failure is reported, not retried."""
    (tmp_path / "sample.json").write_text(LLAMA_BENCH_JSON)
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\necho \"$@\" >> " + str(tmp_path / "calls.txt") + "\n"
                    "case \"$*\" in *'--repack 0'*) cat " + str(tmp_path / "sample.json") + ";; "
                    "*nogood*) echo 'error: bad model' >&2; exit 1;; *) exit 132;; esac\n")
    fake.chmod(0o755)
    monkeypatch.setattr(peers, "LLAMACPP_BIN", tmp_path)
    out = peers.measure_llamacpp(tmp_path / "m.gguf", 2, 64, 64)
    assert out["repack"] is False and out["decode_tok_s"] == pytest.approx(59.5235)
    assert out["mem_mb"] > 0
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 2 and "-t 2" in calls[0] and calls[1].endswith("--repack 0")
    with pytest.raises(peers.BenchError, match="exited 1: error: bad model"):
        peers.measure_llamacpp(tmp_path / "nogood.gguf", 1, 64, 64)
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 3


def test_derived_row_sets_the_accuracy_level(tmp_path):
    """An OURS_DERIVED row is its base folder with accuracy_level on every SpQRMatMul, nothing else changed."""
    import argparse

    import onnx
    from onnx import TensorProto, helper

    base = tmp_path / "ours" / "spqr-w4-head4"
    base.mkdir(parents=True)
    node = helper.make_node("SpQRMatMul", ["x", "w"], ["y"], domain="qcompiler", K=4, N=4, accuracy_level=0)
    graph = helper.make_graph([node, helper.make_node("Relu", ["y"], ["z"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph), str(base / "model.onnx"))
    (base / "quant_config.json").write_text('{"method": "spqr"}')
    (base / "model.onnx.data").write_bytes(b"weights")
    prep = peers.Preparer(argparse.Namespace(source=None), tmp_path)
    out = tmp_path / "ours" / "spqr-w4-head4-a4"
    prep.derived("spqr-w4-head4-a4", out)
    got = onnx.load(str(out / "model.onnx"))
    attrs = {a.name: a.i for a in got.graph.node[0].attribute}
    assert attrs["accuracy_level"] == 4 and attrs["K"] == 4
    assert [n.op_type for n in got.graph.node] == ["SpQRMatMul", "Relu"]
    assert (out / "model.onnx.data").read_bytes() == b"weights"
    assert peers.json.loads((out / "quant_config.json").read_text()) == {"method": "spqr", "accuracy_level": 4}
    assert not peers._stale(out / "model.onnx", base / "model.onnx")


def test_default_output_never_overwrites_a_report(tmp_path):
    day = datetime.date(2026, 12, 6)
    assert peers.default_output(tmp_path, day) == tmp_path / "peers-2026-12-06.md"
    (tmp_path / "peers-2026-12-06.md").write_text("kept")
    assert peers.default_output(tmp_path, day) == tmp_path / "peers-2026-12-06-2.md"
    (tmp_path / "peers-2026-12-06-2.json").write_text("{}")
    assert peers.default_output(tmp_path, day) == tmp_path / "peers-2026-12-06-3.md"


def test_llamacpp_cmake_turns_on_only_what_the_cpu_has():
    # llama.cpp is built for the machine it is measured on: AVX-512 options where the CPU has them (a Sapphire Rapids
    # VM), off on an AVX2-only CPU (an AMD EPYC Zen 3 VM: an AVX-512 build dies of SIGILL there); AMX always off.
    zen3 = {"avx", "avx2", "fma", "f16c", "bmi2"}
    spr = zen3 | {"avx512f", "avx512vbmi", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile"}
    assert "-DGGML_AVX512=OFF" in peers.llamacpp_cmake(zen3) and "-DGGML_AVX512_VNNI=OFF" in peers.llamacpp_cmake(zen3)
    assert "-DGGML_AVX512=ON" in peers.llamacpp_cmake(spr) and "-DGGML_AVX512_BF16=ON" in peers.llamacpp_cmake(spr)
    for flags in (zen3, spr):
        assert "-DGGML_AMX_TILE=OFF" in peers.llamacpp_cmake(flags) and "-DGGML_AVX2=ON" in peers.llamacpp_cmake(flags)
