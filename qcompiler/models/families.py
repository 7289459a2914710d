"""Model families as data: where the decoder layers are, which linears a method quantizes and in what order.

A family is a frozen `Family` record (about 15 lines each, in the style of GPTQModel's model definitions); helpers
(`iter_layers`, `quantizable_linears`, `get_module`, `norm_paths`, `layer_attention`) read the record and never
branch on the family name (tests/test_families.py fails on a comparison of a family name or `model_type` with a
string anywhere in the package). Adding a family that shares LLaMA's layout is a
`dataclasses.replace(LLAMA, name=..., model_types=...)`; what differs between architectures is a field of the record
(`Norm`, `qk_norms`, `output_norms`, `fused`, `attention`), never an if/elif.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional

import torch

from qcompiler import QCompilerError


@dataclasses.dataclass(frozen=True)
class Norm:
    """What a family's normalization layers compute: `y = x̂ ⊙ (weight + weight_offset) + bias`.

    Attributes:
        kind: "rmsnorm" (`x̂ = x / rms(x)`) or "layernorm" (`x̂ = (x − mean) / std`); descriptive (the graph carries
            the norm as exported), checked against the model's modules by tests/test_families.py.
        has_bias: the norm has a bias (LayerNorm): a transform's shift folds into it; without one (RMSNorm) the
            shift is folded into the next linears' biases (qcompiler/quantize/transforms.py) and AffineQuant learns
            no shift.
        weight_offset: constant added to the stored weight (Gemma's RMSNorm computes `x̂ ⊙ (1 + weight)`: 1.0).
            The PyTorch transform fold keeps it out of the scaling (`qcompiler.graph.fold.fold_into_norm(offset=)`:
            `(w + c)·p − c`); in the graph the exporter stores `1 + w` as the norm's weight constant, which the
            `fold-affine-into-norm` pass scales as it is.
    """

    kind: str
    has_bias: bool
    weight_offset: float = 0.0


RMSNORM = Norm(kind="rmsnorm", has_bias=False)
LAYERNORM = Norm(kind="layernorm", has_bias=True)


@dataclasses.dataclass(frozen=True)
class FusedLinear:
    """One `nn.Linear` whose output rows stack several logical projections (Phi-3's `self_attn.qkv_proj` = q, k, v;
    `mlp.gate_up_proj` = gate, up). It is quantized and exported as one linear (one `SpQRMatMul`), listed under its
    own path in `Family.sequential` / `norm_linears`.

    Attributes:
        path: the fused linear, relative to the decoder layer.
        parts: logical projections in output-row order ("q", "k", "v").
    """

    path: str
    parts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Attention:
    """The attention of one decoder layer.

    Attributes:
        sliding_window: tokens a query attends back to (a local layer), None for global attention.
        rope: rotary position embedding on q/k (False: a NoPE layer).
    """

    sliding_window: Optional[int] = None
    rope: bool = True


GLOBAL_ROPE = Attention()


def hf_attention(config: Any, index: int) -> Attention:
    """Layer `index`'s attention as transformers' modeling code reads the config: with `config.layer_types`, a
    "sliding_attention" layer attends `config.sliding_window` tokens back and the others globally (Qwen2/Qwen3 with
    `use_sliding_window`, Gemma); without it, `config.sliding_window` applies to every layer (Mistral). A window that
    covers `max_position_embeddings` is global attention: no query is that far from a key. Rotary on every layer."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None and types[index] != "sliding_attention":
        window = None
    limit = getattr(config, "max_position_embeddings", None)
    if window is not None and limit is not None and window >= limit:
        window = None
    return Attention(sliding_window=window)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one decoder-only architecture is laid out. Paths are dotted module paths as in `model.named_modules()`.

    Attributes:
        name: family name used in reports and the output config ("llama", "opt", ...).
        model_types: HF `config.model_type` values served by this family.
        layers: path of the `nn.ModuleList` of decoder layers, relative to the causal-LM model.
        sequential: quantizable linears of one decoder layer (paths relative to the layer) in true-sequential
            groups: linears of one group see the same input and are quantized together; a group's inputs depend
            on the groups before it (GPTQ `--true-sequential`).
        norm: what the normalization layers compute (`Norm`: RMSNORM, LAYERNORM, or one with a weight offset).
        norm_linears: (norm, linears it feeds) pairs within a layer, for scale folding (AffineQuant/AWQ/SmoothQuant).
        v_o: (v projection, o projection) pair within a layer (the value→output fold, per KV head group).
        embeddings: token-embedding path(s) relative to the model (not quantized).
        final_norm: path of the norm after the last layer.
        lm_head: path of the output projection (not quantized by default; may be tied to the embedding).
        has_linear_bias: whether the quantizable linears carry biases (True for OPT; qwen2 has q/k/v biases only).
        genai_type: onnxruntime-genai's `model.type` for this family (genai_config.json), None if it has none.

    Optional hooks (the defaults describe LLaMA, Mistral, Qwen2 and OPT):

        qk_norms: (q norm, k norm) per-head norms on the query/key projections' outputs (Qwen3, Gemma 3:
            `self_attn.q_norm`, `self_attn.k_norm`), None without. Not quantized and not touched by the transforms
            (AffineQuant learns no q/k transform); listed in `norm_paths` so tests/test_families.py can check that a
            record names every norm of its layers.
        output_norms: norms applied to the attention / MLP output before the residual add (Gemma 2/3:
            `post_attention_layernorm`, `post_feedforward_layernorm`; their input norms are in `norm_linears`). They
            feed no linear of the layer, so no transform folds into them; listed in `norm_paths`.
        fused: linears that stack several projections (`FusedLinear`; Phi-3: qkv_proj, gate_up_proj). Every method
            quantizes them as one linear; AffineQuant learns no value → output transform when the `v_o` value
            projection is fused (`qcompiler.quantize.transforms.head_pair`).
        attention: `(text config, layer index) → Attention` (sliding window / global, rotary / NoPE); default
            `hf_attention`, what transformers' modeling code reads from the config (`layer_types`,
            `sliding_window`). The exporter traces that modeling code (its masks and rotary included) with a full
            KV cache per layer, so this is descriptive: `quant_config.json` reports it and the tests check it
            against the configs.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    sequential: tuple[tuple[str, ...], ...]
    norm: Norm
    norm_linears: tuple[tuple[str, tuple[str, ...]], ...]
    v_o: tuple[str, str]
    embeddings: tuple[str, ...]
    final_norm: str
    lm_head: str = "lm_head"
    has_linear_bias: bool = False
    genai_type: Optional[str] = None
    qk_norms: Optional[tuple[str, str]] = None
    output_norms: tuple[str, ...] = ()
    fused: tuple[FusedLinear, ...] = ()
    attention: Callable[[Any, int], Attention] = hf_attention

    @property
    def linear_names(self) -> tuple[str, ...]:
        """All quantizable linears of one layer (relative paths), in sequential order."""
        return tuple(name for group in self.sequential for name in group)


LLAMA = Family(
    name="llama",
    model_types=("llama",),
    layers="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    norm=RMSNORM,
    norm_linears=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    v_o=("self_attn.v_proj", "self_attn.o_proj"),
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    genai_type="llama",
)

# Same layout as LLaMA; nothing to add.
MISTRAL = dataclasses.replace(LLAMA, name="mistral", model_types=("mistral",), genai_type="mistral")

# Same layout as LLaMA. q/k/v carry biases (o_proj and the MLP do not); `quantizable_linears` reads the bias from
# each nn.Linear, so `has_linear_bias` only documents that some linears have one.
QWEN2 = dataclasses.replace(LLAMA, name="qwen2", model_types=("qwen2",), has_linear_bias=True, genai_type="qwen2")

# LLaMA's layout plus an RMSNorm per head on q and on k (transformers' modeling_qwen3.py: `q_norm(q_proj(x))` and
# `k_norm(k_proj(x))` over head_dim, before the rotation); no q/k/v biases; head_dim is a config field, not
# hidden/heads. The exporter traces the norms as they are; they are not quantized and no transform folds into them.
QWEN3 = dataclasses.replace(LLAMA, name="qwen3", model_types=("qwen3",), qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
                            genai_type="qwen3")

def smollm3_attention(config: Any, index: int) -> Attention:
    """SmolLM3: transformers' `hf_attention`, with rotary embedding only on the layers whose
    `config.no_rope_layers[index]` is 1 (every `no_rope_layer_interval`-th layer is NoPE: modeling_smollm3.py skips
    `apply_rotary_pos_emb` there)."""
    attention = hf_attention(config, index)
    flags = getattr(config, "no_rope_layers", None)
    return dataclasses.replace(attention, rope=bool(flags[index])) if flags is not None else attention


# LLaMA's layout; some layers skip the rotary embedding (NoPE).
SMOLLM3 = dataclasses.replace(LLAMA, name="smollm3", model_types=("smollm3",), attention=smollm3_attention,
                              genai_type="smollm3")

# LLaMA's layout; the embedding / residual / attention multipliers and the logits scaling are scalars in the
# modeling code (traced into the graph as constants), between modules no transform folds across: the norm→linears
# and value→output folds are unchanged.
GRANITE = dataclasses.replace(LLAMA, name="granite", model_types=("granite",), genai_type="granite")

# Phi-3 / Phi-3.5 / Phi-4-mini: q, k, v in one linear (`qkv_proj`) and gate, up in one (`gate_up_proj`). Quantized as
# one linear each: the rows of a fused linear see the same input (the same Hessian for GPTQ/SpQR, the same norm for
# AffineQuant's norm→linears transform), so quantizing them together is what quantizing the split q/k/v with a shared
# calibration would do, and the export keeps the checkpoint's one MatMul (one SpQRMatMul) per fused linear.
PHI3 = Family(
    name="phi3",
    model_types=("phi3",),
    layers="model.layers",
    sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    norm=RMSNORM,
    norm_linears=(("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
    v_o=("self_attn.qkv_proj", "self_attn.o_proj"),
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    genai_type="phi3",
    fused=(FusedLinear("self_attn.qkv_proj", ("q", "k", "v")), FusedLinear("mlp.gate_up_proj", ("gate", "up"))),
)

# Gemma 2: RMSNorm computes x̂·(1 + w); four norms per layer (input → q/k/v, pre-feedforward → gate/up; the post-
# attention and post-feedforward norms scale the block outputs before the residual add); GeGLU (tanh GELU), √hidden
# embedding scale, query_pre_attn_scalar, attention and final logit soft-capping and interleaved sliding-window
# layers are all in the modeling code the exporter traces.
GEMMA2 = dataclasses.replace(
    LLAMA, name="gemma2", model_types=("gemma2",), norm=Norm(kind="rmsnorm", has_bias=False, weight_offset=1.0),
    norm_linears=(LLAMA.norm_linears[0], ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    genai_type="gemma2", output_norms=("post_attention_layernorm", "post_feedforward_layernorm"))

# Gemma 3 (text): Gemma 2's layout plus per-head q/k norms (also 1 + w); local and global layers use different rope
# bases (rope_parameters per layer type), which the traced rotary module computes.
GEMMA3 = dataclasses.replace(GEMMA2, name="gemma3_text", model_types=("gemma3_text",), genai_type="gemma3_text",
                             qk_norms=("self_attn.q_norm", "self_attn.k_norm"))

OPT = Family(
    name="opt",
    model_types=("opt",),
    layers="model.decoder.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    norm=LAYERNORM,
    norm_linears=(
        ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("final_layer_norm", ("fc1",)),
    ),
    v_o=("self_attn.v_proj", "self_attn.out_proj"),
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm",
    has_linear_bias=True,
)

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, SMOLLM3, GRANITE, PHI3, GEMMA2, GEMMA3, OPT)
_BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


def supported_model_types() -> list[str]:
    """HF `model_type` values with a family, sorted."""
    return sorted(_BY_MODEL_TYPE)


def family_for(config) -> Family:
    """The family of a HF config (or of a model: its `.config` is used). Raises QCompilerError if unsupported."""
    config = getattr(config, "config", config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    model_type = getattr(config, "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise QCompilerError(
            f"unsupported architecture '{model_type}': supported model types are {', '.join(supported_model_types())}"
        )
    return family


def layer_attention(family: Family, config) -> list[Attention]:
    """`Attention` of every decoder layer of a model with HF (text) config `config`, from `family.attention`."""
    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    return [family.attention(config, i) for i in range(n)]


def norm_paths(family: Family) -> tuple[str, ...]:
    """Every norm of one decoder layer (relative paths): the input norms of `norm_linears`, `qk_norms`,
    `output_norms`."""
    return (*(n for n, _ in family.norm_linears), *(family.qk_norms or ()), *family.output_norms)


def fused_linear(family: Family, path: str) -> Optional[FusedLinear]:
    """The `FusedLinear` record of layer-relative `path`, None if it is a plain linear."""
    return next((f for f in family.fused if f.path == path), None)


def get_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at dotted `path` (QCompilerError naming the path if absent)."""
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        raise QCompilerError(f"model of type {type(model).__name__} has no module '{path}'") from e


def iter_layers(model: torch.nn.Module, family: Family) -> Iterator[tuple[str, torch.nn.Module]]:
    """Yield `(layer_path, decoder_layer)` in order, e.g. `("model.layers.0", LlamaDecoderLayer)`."""
    layers = get_module(model, family.layers)
    for i, layer in enumerate(layers):
        yield f"{family.layers}.{i}", layer


def layer_linears(layer: torch.nn.Module, family: Family) -> dict[str, torch.nn.Linear]:
    """Quantizable linears of one decoder layer: `{relative_path: nn.Linear}` in sequential order."""
    out = {}
    for name in family.linear_names:
        module = get_module(layer, name)
        if not isinstance(module, torch.nn.Linear):
            raise QCompilerError(f"'{name}' in a {family.name} layer is {type(module).__name__}, not nn.Linear")
        out[name] = module
    return out


def quantizable_linears(model: torch.nn.Module, family: Family) -> dict[str, torch.nn.Linear]:
    """All quantizable linears: `{full_module_path: nn.Linear}` ("model.layers.0.self_attn.q_proj", ...), layer by
    layer in sequential order. Embeddings and lm_head are not included."""
    return {
        f"{layer_path}.{name}": module
        for layer_path, layer in iter_layers(model, family)
        for name, module in layer_linears(layer, family).items()
    }
