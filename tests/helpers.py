"""Helpers shared by the tests (and scripts/aarch64_cases.py): tiny random-weight HF models with a local tokenizer
(the hub is unreachable), a tiny GGUF writer, the CLI run in process and its error-line checks, and the kernel
reference check. Import as `from tests.helpers import ...` (the repository root is on sys.path under pytest, and for
`python -m ...` run from the root); pytest's fixtures over these live in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
VOCAB = 128

def make_tokenizer(vocab_size: int = VOCAB):
    """A word-level tokenizer built locally (the hub is unreachable)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _bpe_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary of `VOCAB` tokens over `make_tokenizer`'s words w0..w18 ("Ġ" marks a leading
    space, as GPT-2's byte map writes it) and its merges."""
    digits = [str(i) for i in range(10)]
    tokens = (["<unk>", "<s>", "</s>"] + [chr(x) for x in range(33, 127)] + ["\u0120", "\u0120w"]
              + [f"w{i}" for i in digits] + [f"\u0120w{i}" for i in digits] + [f"w1{i}" for i in digits[:9]])
    merges = (["\u0120 w"] + [f"w {i}" for i in digits] + [f"\u0120w {i}" for i in digits]
              + [f"w1 {i}" for i in digits[:9]])
    assert len(tokens) == VOCAB
    return tokens, merges


def make_bpe_tokenizer():
    """A byte-level BPE tokenizer over `_bpe_vocab`: what transformers 5 needs for a `qwen2` (or `phi3`) folder, whose
    tokenizer it always loads as that model's own class (Qwen2Tokenizer reads the vocabulary and merges and applies
    its byte-level pre-tokenizer: a word-level tokenizer would give no tokens at all)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = _bpe_vocab()
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges], unk_token="<unk>")
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(kind: str):
    from transformers import (Gemma2Config, Gemma3TextConfig, GraniteConfig, LlamaConfig, MistralConfig, OPTConfig,
                              Phi3Config, Qwen2Config, Qwen3Config, SmolLM3Config)

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    if kind == "llama":
        return LlamaConfig(intermediate_size=96, num_key_value_heads=2, **common)
    if kind == "llama3":  # Llama 3.1/3.2: the llama3 rope scaling, tied embeddings (3.2 1B/3B)
        return LlamaConfig(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "factor": 8.0, "original_max_position_embeddings": 32}, **common)
    if kind == "qwen3":  # head_dim set apart from hidden/heads, as Qwen3's configs do
        return Qwen3Config(intermediate_size=96, num_key_value_heads=2, head_dim=32, **common)
    if kind == "qwen2":
        return Qwen2Config(intermediate_size=96, num_key_value_heads=2, **common)
    if kind == "mistral":
        return MistralConfig(intermediate_size=96, num_key_value_heads=2, **common)
    if kind == "mistral-swa":  # a sliding window shorter than the sequences the tests run
        return MistralConfig(intermediate_size=96, num_key_value_heads=2, sliding_window=8, **common)
    if kind == "qwen2-swa":  # Qwen2.5 with use_sliding_window: the layers from max_window_layers on are local
        return Qwen2Config(intermediate_size=96, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                           max_window_layers=1, **common)
    if kind == "phi3":  # Phi-3.5-mini / Phi-4-mini: fused qkv and gate_up, longrope, partial rotary (Phi-4-mini)
        return Phi3Config(intermediate_size=96, num_key_value_heads=2, original_max_position_embeddings=32,
                          partial_rotary_factor=0.75, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                           "short_factor": [1.0 + 0.1 * i for i in range(6)],
                                           "long_factor": [2.0 + 0.5 * i for i in range(6)],
                                           "factor": 8.0, "original_max_position_embeddings": 32}, **common)
    if kind in ("gemma2", "gemma3_text"):  # sliding layers interleaved with global ones, a window of 8
        cls = Gemma2Config if kind == "gemma2" else Gemma3TextConfig
        extra = ({"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0} if kind == "gemma2"
                 else {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                           "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}})
        return cls(intermediate_size=96, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                   sliding_window=8, layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
                   bos_token_id=1, eos_token_id=2, **extra, **common)
    if kind == "smollm3":  # layer 1 is NoPE (no_rope_layer_interval 2)
        return SmolLM3Config(intermediate_size=96, num_key_value_heads=2, no_rope_layer_interval=2, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, **common)
    if kind == "granite":
        return GraniteConfig(intermediate_size=96, num_key_value_heads=2, embedding_multiplier=12.0,
                             residual_multiplier=0.22, attention_multiplier=0.0078125, logits_scaling=8.0, **common)
    if kind == "opt":
        return OPTConfig(ffn_dim=96, word_embed_proj_dim=64, **common)
    raise ValueError(kind)


def tiny_model(kind: str, seed: int = 0):
    """A tiny random model in eval mode; biases and norms randomized so nothing is trivially zero/one."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
            elif p.ndim == 1:  # norm weights
                p.uniform_(0.8, 1.2)
    return model


# How llama.cpp's converter (convert_hf_to_gguf.py) writes each tiny model: its `general.architecture` (Mistral is
# written as llama; transformers tells it apart by "mistral" in `general.name`), and the value conventions the
# loaders undo: the q/k rows of "llama" permuted for its RoPE, Gemma's norm weights stored as `1 + w`.
_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
              "gemma2": "gemma2", "gemma3_text": "gemma3"}
GGUF_KINDS = tuple(_GGUF_ARCH)


def gguf_model(kind: str):
    """The tiny model of `kind` as a GGUF file can describe it: a GGUF file holds no Qwen3 head_dim (transformers
    takes the class default), no Gemma query_pre_attn_scalar or layer pattern (defaults again), so the model written
    carries those defaults. Phi-3's longrope and partial rotary and Gemma 2's soft-capping (0.5 / 1 here, not the
    class defaults) are stored by llama.cpp and read back by `qcompiler.models.loading.complete_gguf_config`."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(kind)
    if kind == "qwen3":
        cfg.head_dim = type(cfg)().head_dim
    if kind.startswith("gemma"):
        cfg.query_pre_attn_scalar = type(cfg)().query_pre_attn_scalar
        if kind == "gemma2":
            cfg.final_logit_softcapping, cfg.attn_logit_softcapping = 0.5, 1.0  # caps the tiny logits reach
        cfg = type(cfg)(**{k: v for k, v in cfg.to_dict().items() if k not in ("layer_types", "rope_parameters")})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
            elif p.ndim == 1:
                p.uniform_(0.8, 1.2)
    return model


def write_tiny_gguf(path: Path, *, kind: str = "llama", tied: bool = False):
    """Write the tiny model of `kind` (`gguf_model`) as a GGUF file the way llama.cpp's converter lays it out
    (tensor names: the inverse of transformers' own GGUF name map; q/k rows permuted for "llama", Gemma's norms as
    `1 + w`; a byte-level BPE tokenizer over `make_tokenizer`'s words; ffn_down in Q8_0, the rest F32; `tied`: no
    output.weight, so loaders tie lm_head to the embedding — Gemma always is). Returns the model written."""
    import gguf
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    model = gguf_model(kind)
    c = model.config
    arch = _GGUF_ARCH[kind]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{kind}")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = c.rope_parameters
    w.add_rope_freq_base(float(rope.get("rope_theta") or rope["full_attention"]["rope_theta"]))  # Gemma 3: global
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if rope.get("rope_type") == "longrope":  # as llama.cpp's Phi-3 conversion stores it
        import math

        original = rope["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(c.max_position_embeddings / original)
                                                  / math.log(original)))
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    if getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
    if getattr(c, "attn_logit_softcapping", None):
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    tokens, merges = _bpe_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * VOCAB)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(0)

    def permute(W, n_head):  # llama.cpp's q/k row order (transformers' GGUF loader reverses it)
        return W.reshape(n_head, 2, W.shape[0] // n_head // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)

    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=c.to_dict())
    gguf_of = {hf: g for g, hf in get_gguf_hf_weights_map(model, processor, model_type=arch).items()}
    tied = tied or c.tie_word_embeddings
    for name, p in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        W = p.detach().numpy().astype(np.float32)
        g = gguf_of[name]
        if arch == "llama" and ".attn_q." in g:
            W = permute(W, c.num_attention_heads)
        elif arch == "llama" and ".attn_k." in g:
            W = permute(W, c.num_key_value_heads)
        if arch.startswith("gemma") and g.endswith("norm.weight"):
            W = W + 1
        if g.endswith("ffn_down.weight"):
            q = gguf.quants.quantize(W, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, W)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def run_cli(capsys, *argv):
    """`qcompiler ARGV` in process → (exit code, stdout, stderr)."""
    from qcompiler.cli import main

    capsys.readouterr()  # drop what building the arguments printed (e.g. a fixture saving a tiny model)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The CLI's error: exactly one non-empty stderr line, starting with "qcompiler: error: "."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("qcompiler: error: "), lines[0]
    return lines[0]


def assert_no_output(path) -> None:
    assert not path.exists(), f"partial output left behind: {sorted(p.name for p in path.iterdir())}"


def assert_matches_reference(weight, x, y, activation: str = "") -> None:
    """`y`, an SpQRMatMul kernel's output for `x`, against the NumPy reference `weight.matmul(x)` (then the node's
    `activation`, format.apply_activation): same dtype and shape, max error within 1e-4 (fp32) or 2e-3 (fp16: the
    output's rounding, 2^-10 relative, dominates) of the reference's largest magnitude."""
    import numpy as np

    from qcompiler.graph.format import apply_activation

    ref = apply_activation(weight.matmul(x), activation)
    assert y.dtype == x.dtype and y.shape == x.shape[:-1] + (ref.shape[-1],)
    scale = float(np.abs(ref.astype(np.float32)).max())
    rel = 1e-4 if x.dtype == np.float32 else 2e-3
    err = float(np.abs(y.astype(np.float32) - ref.astype(np.float32)).max())
    assert err <= rel * scale, f"max |err| {err:.3g} > {rel} * {scale:.3g}"


_FUZZ_SEED: list[int] = []


def fuzz_seed() -> int:
    """This run's seed for the exploring fuzz cases: $QCOMPILER_FUZZ_SEED when set (to replay a run), else drawn once per
    process; pytest prints it in its header (tests/conftest.py)."""
    if not _FUZZ_SEED:
        import os
        import random

        env = os.environ.get("QCOMPILER_FUZZ_SEED")
        _FUZZ_SEED.append(int(env) if env else random.SystemRandom().randrange(2**32))
    return _FUZZ_SEED[0]
