"""Fused attention in the export: every attention of the traced model becomes one `com.microsoft::GroupQueryAttention`.

transformers calls the attention function registered for the config's `_attn_implementation` with q/k after the
family's own q/k norms and rotation, and with the family's `scaling`, `softcap` and `sliding_window`. We register one
("qcompiler_gqa") that, under `torch.onnx.export`, emits GroupQueryAttention (`torch.onnx.ops.symbolic_multi_out`),
so no family is matched by pattern:

    q, k, v       [batch, seq, heads·head_dim]          (BSH: transposed from transformers' BNSH)
    past_key/value [batch, kv_heads, past, head_dim]     (the graph's past_key_values.*: BNSH)
    seqlens_k     int32 [batch] = Σ attention_mask − 1   total_sequence_length int32 scalar = attention_mask's length
    → output [batch, seq, heads·head_dim], present_key/value [batch, kv_heads, max(past, total), head_dim]

The op appends the step's k/v to the past itself, so the cache given to the model returns them unconcatenated
(`NewOnlyCache`). No mask is built (an `AttentionMaskInterface` entry returning None): GroupQueryAttention applies
causality and the sliding window, and reads each row's length from `seqlens_k`. With past and present bound to one
buffer (`past_present_share_buffer`: onnxruntime-genai, `qcompiler generate`) the op writes the new step in place.

What ONNX Runtime defines and the standard-op graph does not: a row's valid tokens are its first `seqlens_k + 1`
(right padding); the standard-op graph (`--no-contrib-ops`) takes any attention mask.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

IMPLEMENTATION = "qcompiler_gqa"
HEAD_SIZE_MULTIPLE = 16  # ONNX Runtime's GroupQueryAttention kernels: "head_size shall be a multiple of 16"


def supported(head_dim: int) -> bool:
    """Whether ONNX Runtime's GroupQueryAttention takes heads of `head_dim` (else the export keeps standard ops)."""
    return head_dim % HEAD_SIZE_MULTIPLE == 0

_ACTIVE: list["AttentionStep"] = []


class AttentionStep:
    """The per-forward state the attention function reads (one per traced call): each layer's past and the lengths
    from the attention mask; it collects each layer's presents."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor):
        self.past = past
        self.seqlens_k = (attention_mask.sum(1) - 1).to(torch.int32)
        self.total = torch.tensor(attention_mask.shape[1], dtype=torch.int32)
        self.present: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(past)

    def presents(self) -> list[torch.Tensor]:
        missing = [i for i, p in enumerate(self.present) if p is None]
        if missing:
            raise RuntimeError(f"fused attention: layers {missing} did not call the attention function")
        return [t for pair in self.present for t in pair]


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
               sliding_window=None, **kwargs):
    """transformers' attention-function signature; emits GroupQueryAttention (the attention weights are None)."""
    step = _ACTIVE[-1]
    batch, heads, seq, head_dim = query.shape
    kv_heads = key.shape[1]
    past_key, past_value = step.past[module.layer_idx]
    q = query.transpose(1, 2).reshape(batch, seq, heads * head_dim)
    k = key.transpose(1, 2).reshape(batch, seq, kv_heads * head_dim)
    v = value.transpose(1, 2).reshape(batch, seq, kv_heads * head_dim)
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads,
             "scale": float(scaling if scaling is not None else head_dim ** -0.5)}
    if softcap:
        attrs["softcap"] = float(softcap)
    if sliding_window:
        attrs["local_window_size"] = int(sliding_window)
    total = past_key.shape[2] + seq
    out, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention", [q, k, v, past_key, past_value, step.seqlens_k, step.total], attrs,
        dtypes=[q.dtype] * 3, shapes=[q.shape] + [[batch, kv_heads, total, head_dim]] * 2, version=1)
    step.present[module.layer_idx] = (present_key, present_value)
    return out.view(batch, seq, heads, head_dim), None


def register() -> None:
    """Register the attention function and its (absent) mask with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)


def _no_mask(*args, **kwargs):
    return None


@contextlib.contextmanager
def fused_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within: `model` (and every config its modules hold) computes attention with GroupQueryAttention."""
    register()
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    saved = {key: getattr(cfg, "_attn_implementation", None) for key, cfg in configs.items()}
    try:
        for cfg in configs.values():
            cfg._attn_implementation = IMPLEMENTATION
        yield
    finally:
        for key, cfg in configs.items():
            cfg._attn_implementation = saved[key]


@contextlib.contextmanager
def attention_step(step: AttentionStep) -> Iterator[AttentionStep]:
    _ACTIVE.append(step)
    try:
        yield step
    finally:
        _ACTIVE.pop()


def new_only_cache():
    """A cache whose `update` hands back the step's own k/v: GroupQueryAttention concatenates them with the past."""
    from transformers import DynamicCache

    class NewOnlyCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return key_states, value_states

    return NewOnlyCache()
