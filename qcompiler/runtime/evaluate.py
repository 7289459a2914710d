"""Perplexity of a PyTorch model or an ONNX Runtime session over token windows (GPTQ's evaluation protocol), and of
an exported folder (`evaluate_folder`: `qcompiler eval`), in ONNX Runtime or as its PyTorch fake-quant model
(`torch_model_from_folder`).

Both backends feed each window `[1, seqlen]` from an empty cache, and share `window_nll`: logits at positions
`0..S-2` predict tokens `1..S-1`; the summed NLL over all predicted tokens of all windows gives
`ppl = exp(total_nll / total_tokens)`. With equal windows this is GPTQ's `exp(mean of per-window mean losses)`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from qcompiler import QCompilerError
from qcompiler.folder import CONFIG_FILE, MODEL_FILE

log = logging.getLogger("qcompiler")

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


def torch_model_from_folder(folder: str | Path, *, model_override: Optional[str] = None):
    """The PyTorch fake-quant model of an exported folder: the source model with each quantized linear's weight
    replaced by the decoded SpQRMatMul weight (read back from model.onnx). Returns (model, tokenizer)."""
    from qcompiler.models.loading import load_model
    from qcompiler.graph.onnx_op import node_parts, weights_from_node
    from qcompiler.graph.format import DOMAIN, OP_TYPE
    from qcompiler.quantize.lm_head import untie

    folder = Path(folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    source = model_override or cfg["source"]
    model, tokenizer = load_model(source)
    import onnx

    proto = onnx.load(str(folder / MODEL_FILE), load_external_data=True)
    inits = {t.name: t for t in proto.graph.initializer}
    modules = dict(model.named_modules())
    n = 0
    for node in proto.graph.node:
        if node.op_type != OP_TYPE or node.domain != DOMAIN:
            continue
        for module, w in weights_from_node(node, inits):  # a fused node (q/k/v, gate/up): each linear's rows
            if module not in modules:
                raise QCompilerError(f"{folder}: node {node.name} names no module of {source}")
            lin = modules[module]
            untie(model, lin)  # a quantized lm_head tied to the embedding: the lookup keeps the full-precision table
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(w.dequantize()))
                if w.bias is not None:  # AffineQuant folds may give a linear a bias it did not have
                    if lin.bias is None:
                        lin.bias = torch.nn.Parameter(torch.from_numpy(w.bias.copy()), requires_grad=False)
                    else:
                        lin.bias.copy_(torch.from_numpy(w.bias))
            n += 1
    _load_folded_norms(model, inits, modules)
    _load_gathered_embedding(model, proto, inits)
    abits = (cfg.get("config") or {}).get("abits", 16)
    if abits < 16:
        from qcompiler.graph.actquant import install_act_quant

        install_act_quant([modules[m] for n in proto.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN
                           for m, _ in node_parts(n)], abits)
    log.info("loaded %d quantized linears into %s", n, source)
    return model, tokenizer


def _load_gathered_embedding(model: torch.nn.Module, proto, inits: dict) -> None:
    """An embedding served from a quantized lm_head (`qcompiler::SpQRGather`) gets that lm_head's decoded weight."""
    from qcompiler.graph.format import DOMAIN, OP_TYPE
    from qcompiler.graph.gather_op import OP_TYPE as GATHER
    from qcompiler.graph.onnx_op import weight_from_node

    by_qweight = {n.input[1]: n for n in proto.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN}
    for node in proto.graph.node:
        if node.op_type == GATHER and node.domain == DOMAIN and node.input[1] in by_qweight:
            decoded = weight_from_node(by_qweight[node.input[1]], inits).dequantize()
            with torch.no_grad():
                model.get_input_embeddings().weight.copy_(torch.from_numpy(decoded))


def _load_folded_norms(model: torch.nn.Module, inits: dict, modules: dict) -> None:
    """Norm parameters the fold passes rewrote (initializers named `{norm}.weight` / `.bias`) and what stays after
    a norm (`{norm}.affine_matrix`, `{norm}.affine_shift`: re-attached as a hook), into the source model."""
    from onnx import numpy_helper

    from qcompiler.quantize.transforms import NORM_MATRIX, NORM_SHIFT, attach_norm_residue

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if name in inits and not name.endswith((".weight_t",)) and p.dim() == 1:
                p.copy_(torch.from_numpy(numpy_helper.to_array(inits[name]).copy()))
    for path, module in modules.items():
        matrix, shift = inits.get(f"{path}.{NORM_MATRIX}"), inits.get(f"{path}.{NORM_SHIFT}")
        if matrix is not None or shift is not None:
            attach_norm_residue(
                module,
                matrix=None if matrix is None else torch.from_numpy(numpy_helper.to_array(matrix).copy()),
                shift=None if shift is None else torch.from_numpy(numpy_helper.to_array(shift).copy()),
            )


def evaluate_folder(
    folder: str | Path,
    *,
    dataset: Optional[str | Path] = None,
    seqlen: int = 2048,
    max_windows: Optional[int] = None,
    backend: str = "ort",
    provider: str = "cpu",
    model_override: Optional[str] = None,
    progress: bool = True,
) -> float:
    """Perplexity of an exported folder on `dataset` (non-overlapping windows), in ONNX Runtime or PyTorch;
    `dataset` None: the WikiText-2 test rows of the data folder (`qcompiler.data.default_data_file`)."""
    from transformers import AutoTokenizer

    from qcompiler.data import eval_windows, load_text_tokens

    folder = Path(folder)
    if not (folder / MODEL_FILE).exists() or not (folder / CONFIG_FILE).exists():
        raise QCompilerError(f"not an exported folder (no {MODEL_FILE} / {CONFIG_FILE}): {folder}")
    if dataset is None:
        from qcompiler.data import EVAL_FILE, require_data_file

        dataset = require_data_file(EVAL_FILE, "no evaluation text: pass --dataset PATH (or the name wikitext2 to "
                                               "fetch it with `datasets`)")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokens = load_text_tokens(dataset, tokenizer)
    windows = eval_windows(tokens, seqlen, max_windows)
    if backend == "torch":
        model, _ = torch_model_from_folder(folder, model_override=model_override)
        res = perplexity_torch(model, windows, progress=progress)
    else:
        from qcompiler.runtime.ops import session

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else None
        sess = session(str(folder / MODEL_FILE), providers=providers)
        kv = cfg["kv"]
        res = perplexity_ort(sess, windows, num_layers=kv["num_layers"], num_kv_heads=kv["num_kv_heads"],
                             head_dim=kv["head_dim"], progress=progress)
    return float(getattr(res, "ppl", res))
