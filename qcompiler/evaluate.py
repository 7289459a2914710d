"""Perplexity of a PyTorch model or an ONNX Runtime session over token windows (GPTQ's evaluation protocol).

Both backends feed each window `[1, seqlen]` from an empty cache, and share `window_nll`: logits at positions
`0..S-2` predict tokens `1..S-1`; the summed NLL over all predicted tokens of all windows gives
`ppl = exp(total_nll / total_tokens)`. With equal windows this is GPTQ's `exp(mean of per-window mean losses)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import QCompilerError

_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclasses.dataclass
class PerplexityResult:
    """Perplexity over a set of windows.

    Attributes:
        ppl: `exp(nll / tokens)`.
        nll: summed negative log-likelihood (nats) over all predicted tokens.
        tokens: number of predicted tokens (`windows · (seqlen − 1)`).
        windows: number of windows evaluated.
        window_nll: mean NLL (nats/token) of each window, in order.
    """

    ppl: float
    nll: float
    tokens: int
    windows: int
    window_nll: list[float]

    def __float__(self) -> float:
        return self.ppl


def window_nll(logits: torch.Tensor | np.ndarray, input_ids: torch.Tensor | np.ndarray) -> tuple[float, int]:
    """Summed next-token NLL of one batch: `logits [B, S, V]` (any float type) against `input_ids [B, S]`.

    Returns `(nll_sum in nats, number of predicted tokens = B·(S−1))`; computed in fp32.
    """
    logits = torch.as_tensor(logits).float()
    ids = torch.as_tensor(input_ids).long()
    if logits.shape[:2] != ids.shape:
        raise QCompilerError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(ids.shape)}")
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    labels = ids[:, 1:].reshape(-1)
    nll = torch.nn.functional.cross_entropy(shift_logits, labels, reduction="sum")
    return float(nll), int(labels.numel())


def _result(per_window: list[tuple[float, int]]) -> PerplexityResult:
    if not per_window:
        raise QCompilerError("no windows to evaluate")
    nll = sum(n for n, _ in per_window)
    tokens = sum(t for _, t in per_window)
    return PerplexityResult(
        ppl=math.exp(nll / tokens),
        nll=nll,
        tokens=tokens,
        windows=len(per_window),
        window_nll=[n / t for n, t in per_window],
    )


def perplexity_torch(model: torch.nn.Module, windows: Sequence[torch.Tensor], *, progress: bool = True
                     ) -> PerplexityResult:
    """Perplexity of a HF causal LM over `windows` (each `LongTensor [1, seqlen]`), one forward per window."""
    model.eval()
    device = next(model.parameters()).device
    per_window = []
    with torch.inference_mode():
        for ids in tqdm(windows, desc="ppl (torch)", disable=not progress):
            ids = ids.to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            per_window.append(window_nll(logits, ids))
    return _result(per_window)


def perplexity_ort(
    session: Any,
    windows: Sequence[torch.Tensor],
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of an exported model in ONNX Runtime over `windows`, each fed from an empty KV cache.

    Session inputs: `input_ids [B, S]`, `attention_mask [B, past+S]`, `position_ids [B, S]` (int64),
    `past_key_values.{i}.key|value [B, num_kv_heads, past, head_dim]` (dtype read from the session; past = 0).
    The first output is `logits [B, S, V]`.
    """
    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    missing = [n for n in ("input_ids", *past_names) if n not in inputs]
    if missing:
        raise QCompilerError(f"ONNX model lacks expected inputs: {', '.join(missing[:4])}")
    past_dtype = _ORT_FLOAT_TYPES.get(inputs[past_names[0]].type, np.float32) if past_names else np.float32
    logits_name = session.get_outputs()[0].name
    per_window = []
    for ids in tqdm(windows, desc="ppl (ort)", disable=not progress):
        ids_np = np.ascontiguousarray(torch.as_tensor(ids).cpu().numpy().astype(np.int64))
        B, S = ids_np.shape
        feeds = {
            "input_ids": ids_np,
            "attention_mask": np.ones((B, S), np.int64),
            "position_ids": np.broadcast_to(np.arange(S, dtype=np.int64), (B, S)).copy(),
            **{n: np.zeros((B, num_kv_heads, 0, head_dim), past_dtype) for n in past_names},
        }
        feeds = {k: v for k, v in feeds.items() if k in inputs}
        unknown = [n for n in inputs if n not in feeds]
        if unknown:
            raise QCompilerError(f"ONNX model has inputs perplexity_ort cannot feed: {', '.join(unknown[:4])}")
        logits = session.run([logits_name], feeds)[0]
        per_window.append(window_nll(logits, ids_np))
    return _result(per_window)
