"""The supported architectures (README's table), on tiny random configs from each HF config class
(tests/helpers.py::tiny_config), Llama 3.x (`llama3` rope scaling, tied embeddings) and Qwen3 (per-head q/k RMSNorm,
head_dim apart from hidden/heads) included. Every method exports on every type, and the export's own validation —
ONNX Runtime with the op library against the PyTorch fake-quant model — passed within the export tolerance. For
Llama 3.x and Qwen3 also: greedy generation through the KV cache equals PyTorch (tests/test_generate.py),
onnxruntime-genai generates the same tokens from the folder as is, prefill + decode equal a full forward
(tests/test_export_passes.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

GENAI_KINDS = {"llama3": "llama", "qwen3": "qwen3", "mistral-swa": "mistral", "qwen2-swa": "qwen2", "phi3": "phi3",
               "gemma2": "gemma2", "gemma3_text": "gemma3_text", "smollm3": "smollm3", "granite": "granite"}
ALL_KINDS = ["llama", "llama3", "mistral", "mistral-swa", "qwen2", "qwen2-swa", "qwen3", "phi3", "gemma2",
             "gemma3_text", "smollm3", "granite", "opt"]  # every row of README's table
FAMILY_OF = {"llama3": "llama", "mistral-swa": "mistral", "qwen2-swa": "qwen2"}
LINEARS_PER_LAYER = {"opt": 6, "phi3": 4}
CAL = ("--nsamples", "4", "--seqlen", "32")
METHODS = {
    "none": (),
    "rtn": ("--bits", "3", "--group-size", "16"),
    "gptq": ("--bits", "3", "--group-size", "16", *CAL),
    "spqr": ("--preset", "sub4", *CAL),
    "affinequant": ("--epochs", "1", *CAL),
    "affinequant+spqr": ("--epochs", "1", *CAL),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_method_exports_and_validates(kind, method, tiny_export, text_file):
    flags = METHODS[method]
    cal = ("--calibration", str(text_file)) if "--nsamples" in flags else ()
    folder = tiny_export(kind, method, *flags, *cal)
    cfg = json.loads((folder / "quant_config.json").read_text())
    v = cfg["validation"]
    assert v["passed"] and v["max_abs_logit_diff"] <= v["limit"]
    assert cfg["family"] == FAMILY_OF.get(kind, kind)
    assert cfg["n_quantized_layers"] == (0 if method == "none" else 2 * LINEARS_PER_LAYER.get(kind, 7))


def test_qwen3_graph_keeps_the_per_head_norms(tiny_export):
    """q_norm / k_norm run before the rotation: the exported graph normalises q and k per head (one RMSNorm each
    per layer, in the module namespaces the exporter writes)."""
    model = onnx.load(str(tiny_export("qwen3", "rtn", *METHODS["rtn"]) / "model.onnx"), load_external_data=False)
    namespaces = {p.value for n in model.graph.node for p in n.metadata_props if p.key == "namespace"}
    for layer in (0, 1):
        for norm in ("q_norm", "k_norm"):
            assert any(f"layers.{layer}.self_attn.{norm}" in ns for ns in namespaces), (layer, norm)


def test_llama3_rope_scaling_reaches_the_graph(tiny_export, tiny_dirs):
    """The llama3 rope scaling changes the rotary frequencies: an export of the same weights without it gives
    different logits (so the scaled frequencies, not the default ones, are what the graph computes)."""
    from transformers import AutoModelForCausalLM

    from qcompiler.runtime.generate import Generator

    src = tiny_dirs("llama3")
    model = AutoModelForCausalLM.from_pretrained(str(src), attn_implementation="eager").eval()
    assert model.config.rope_parameters["rope_type"] == "llama3"
    prompt = list(np.random.default_rng(0).integers(0, 120, size=24))
    gen = Generator(tiny_export("llama3", "none"), threads=1)
    got = gen.generate(prompt, max_new_tokens=6, stop_at_eos=False).token_ids
    import torch

    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(prompt):]
    plain = AutoModelForCausalLM.from_pretrained(str(src), attn_implementation="eager",
                                                 rope_parameters={"rope_type": "default",
                                                                  "rope_theta": 500000.0}).eval()
    with torch.no_grad():
        a = model(torch.tensor([prompt])).logits
        b = plain(torch.tensor([prompt])).logits
    assert float((a - b).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", list(GENAI_KINDS))
def test_genai_generates_the_same_tokens(kind, tiny_export):
    og = pytest.importorskip("onnxruntime_genai")
    from qcompiler.runtime.generate import Generator

    folder = tiny_export(kind, "rtn", *METHODS["rtn"])
    cfg = json.loads((folder / "genai_config.json").read_text())
    assert cfg["model"]["type"] == GENAI_KINDS[kind]
    assert cfg["model"]["decoder"]["head_size"] == {"qwen3": 32, "gemma2": 32, "gemma3_text": 32}.get(kind, 16)
    prompt = [5, 17, 3, 99, 42, 8, 11, 23, 64, 7]  # longer than the tiny configs' windows of 8
    expected = Generator(folder).generate(prompt, max_new_tokens=10, stop_at_eos=False).token_ids
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 10, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(prompt, dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert [int(t) for t in gen.get_sequence(0)[len(prompt):]] == expected


@pytest.mark.parametrize("kind", ALL_KINDS[:-1])  # OPT's LayerNorm and learned positions: neither applies
def test_norms_reach_the_fused_kernel_and_rotary_is_fused(kind, tiny_export, tmp_path):
    """ONNX Runtime's optimiser turns every RMSNorm of the export into one SimplifiedLayerNormalization (Gemma's
    `1 + w` included: the exporter stores the sum as the weight) or, with the residual Add in front of it,
    SkipSimplifiedLayerNormalization (fuse-skip-norm), and fuse-rotary turns every full-head rotation
    into RotaryEmbedding (q and k of each layer with rope: SmolLM3's NoPE layer has none), which
    fuse-attention-rotary moves into the layer's GroupQueryAttention (`do_rotary`) unless, as Gemma 3's, the q/k norm
    comes after the head transpose (the RotaryEmbeddings stay). Phi-3's partial rotary
    (`partial_rotary_factor` < 1) and longrope (the angle table depends on the largest position of the call) stay
    as exported; every layer's attention is one GroupQueryAttention."""
    import onnxruntime as ort

    from qcompiler.models.families import family_for, layer_attention, norm_paths
    from qcompiler.runtime.ops import session
    from tests.helpers import tiny_config

    folder = tiny_export(kind, "rtn", *METHODS["rtn"])
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session(folder / "model.onnx", sess_options=so)
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    ops = [n.op_type for n in optimized.graph.node]
    rotating = [n for n in optimized.graph.node if n.op_type == "GroupQueryAttention"
                and any(a.name == "do_rotary" and a.i == 1 for a in n.attribute)]
    cfg = tiny_config(kind)
    family = family_for(cfg)
    norms = ops.count("SimplifiedLayerNormalization") + ops.count("SkipSimplifiedLayerNormalization")
    assert norms == cfg.num_hidden_layers * len(norm_paths(family)) + 1
    # fuse-skip-norm: every norm reading a residual sum (all but the first layer's input norm; Gemma's post norms
    # read a block's output) takes the Add with it
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * cfg.num_hidden_layers
    rope_layers = sum(a.rope for a in layer_attention(family, cfg))
    assert ops.count("GroupQueryAttention") == cfg.num_hidden_layers
    fused = 0 if kind == "phi3" else rope_layers
    separate = kind == "gemma3_text"
    assert ops.count("RotaryEmbedding") == (2 * fused if separate else 0)
    assert len(rotating) == (0 if separate else fused)


def test_phi3_longrope_switches_tables_past_the_original_context(tiny_export, tiny_dirs):
    """Phi-3's longrope rotates with the short factors while the call's largest position is inside
    `original_max_position_embeddings` (32 here) and with the long factors past it, per forward call, as
    transformers does: a prefill of 28 tokens and decode steps to position 40 equal transformers' own cached decode
    step for step (a graph with one table baked in would differ from position 32 on)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from qcompiler.graph.export import KVLayout
    from qcompiler.runtime.ops import session

    folder = tiny_export("phi3", "none")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dirs("phi3")), attn_implementation="eager").eval()
    layout = KVLayout.from_config(model.config)
    sess = session(folder / "model.onnx")
    names = [o.name for o in sess.get_outputs()]
    ids = np.random.default_rng(3).integers(0, 120, size=(1, 40))

    def feeds(chunk, start, past):
        f = {"input_ids": chunk, "attention_mask": np.ones((1, start + chunk.shape[1]), np.int64),
             "position_ids": np.arange(start, start + chunk.shape[1])[None].astype(np.int64)}
        f.update(past if past is not None else layout.empty_past(1))
        return f

    cache = DynamicCache(config=model.config)
    out, errors = None, []
    for start, end in [(0, 28)] + [(t, t + 1) for t in range(28, 40)]:
        past = None if out is None else {n.replace("present", "past_key_values"): v
                                         for n, v in zip(names[1:], out[1:])}
        out = sess.run(None, feeds(ids[:, start:end], start, past))
        with torch.no_grad():
            ref = model(torch.from_numpy(ids[:, start:end]), cache=cache, use_cache=True,
                        position_ids=torch.arange(start, end)[None]).logits.numpy()
        errors.append(float(np.abs(out[0] - ref).max()))
    assert max(errors) <= 1e-4, errors
    # and the long factors matter: a full forward of the 40 tokens (long tables throughout) differs from the
    # stepwise one at the prefill's positions
    with torch.no_grad():
        full = model(torch.from_numpy(ids)).logits.numpy()
    first = sess.run(["logits"], feeds(ids[:, :28], 0, None))[0]
    assert float(np.abs(full[:, :28] - first).max()) > 1e-3


@pytest.mark.parametrize("kind, expected", [
    ("gemma2", {"sliding_window": [8], "local_layers": [0], "nope_layers": []}),
    ("qwen2-swa", {"sliding_window": [8], "local_layers": [1], "nope_layers": []}),
    ("smollm3", {"sliding_window": [], "local_layers": [], "nope_layers": [1]}),
    ("llama", None),
])
def test_quant_config_reports_the_attention_of_each_layer(kind, expected, tiny_export):
    cfg = json.loads((tiny_export(kind, "none") / "quant_config.json").read_text())
    assert cfg.get("attention") == expected


def test_bits_per_param_says_which_tensors_count(tiny_export, tiny_dirs):
    """quant_config.json's bits/param over the decoder linears (the quantized weights as stored) and over every
    parameter (tied embeddings once; embeddings, norms, lm_head at fp32): the second is what a file size compares."""
    from transformers import AutoModelForCausalLM

    cfg = json.loads((tiny_export("llama3", "rtn", *METHODS["rtn"]) / "quant_config.json").read_text())
    bits = cfg["bits_per_param"]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dirs("llama3"))).eval()
    total = sum(p.numel() for p in model.parameters())  # tied: the embedding once
    assert bits["params_all"] == total
    assert bits["decoder_linears"] == cfg["avg_bits"]
    rest = total - cfg["quantized_params"]
    assert bits["all"] == pytest.approx((cfg["avg_bits"] * cfg["quantized_params"] + 32 * rest) / total)
    assert cfg["avg_bits"] < bits["all"] < 32
