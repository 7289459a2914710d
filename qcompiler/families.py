"""Model families as data: where the decoder layers are, which linears a method quantizes and in what order.

A family is a frozen `Family` record (about 15 lines each, in the style of GPTQModel's model definitions); helpers
(`iter_layers`, `quantizable_linears`, `get_module`) read the record and never branch on the family name. Adding a
family that shares LLaMA's layout is a `dataclasses.replace(LLAMA, name=..., model_types=...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch

from . import QCompilerError


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
        norm: kind of the normalization layers, "rmsnorm" (no bias) or "layernorm" (with bias).
        norm_linears: (norm, linears it feeds) pairs within a layer, for scale folding (AffineQuant/AWQ/SmoothQuant).
        v_o: (v projection, o projection) pair within a layer (the value→output fold, per KV head group).
        embeddings: token-embedding path(s) relative to the model (not quantized).
        final_norm: path of the norm after the last layer.
        lm_head: path of the output projection (not quantized by default; may be tied to the embedding).
        has_linear_bias: whether the quantizable linears carry biases (True for OPT; qwen2 has q/k/v biases only).
        genai_type: onnxruntime-genai's `model.type` for this family (genai_config.json), None if it has none.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    sequential: tuple[tuple[str, ...], ...]
    norm: str
    norm_linears: tuple[tuple[str, tuple[str, ...]], ...]
    v_o: tuple[str, str]
    embeddings: tuple[str, ...]
    final_norm: str
    lm_head: str = "lm_head"
    has_linear_bias: bool = False
    genai_type: Optional[str] = None

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
    norm="rmsnorm",
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
    norm="layernorm",
    norm_linears=(
        ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("final_layer_norm", ("fc1",)),
    ),
    v_o=("self_attn.v_proj", "self_attn.out_proj"),
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm",
    has_linear_bias=True,
)

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, OPT)
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
