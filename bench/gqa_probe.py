"""Probe for issue 26's fused attention (not wired into the exporter yet): transformers' own attention modules
exported with `com.microsoft::GroupQueryAttention`, and ONNX Runtime's CPU kernel checked against transformers.

How it works, the design the exporter is to take over:
- an attention function registered with transformers' `AttentionInterface` ("qcompiler_gqa") receives q/k after each
  family's q/k norms and rotation, and the family's `scaling`, `softcap` and `sliding_window`, so nothing is matched
  per family; under `torch.onnx.export` it emits GroupQueryAttention with `torch.onnx.ops.symbolic_multi_out`
  (q/k/v as BSH, past/present as BNSH, `seqlens_k` = Σ mask − 1 and `total_sequence_length` from the mask);
- the cache handed to the model returns each step's new k/v unconcatenated (`_NewOnly`): the op appends them to the
  past and returns the presents (no shared buffer here: past and present are separate tensors);
- no mask is built (`AttentionMaskInterface` entry returning None): GroupQueryAttention applies causality, the window
  and padding from `seqlens_k`.

    .venv/bin/python -m bench.gqa_probe llama qwen3 gemma2 mistral-swa

prints, per tiny config (tests/helpers.py::tiny_config), the node count and the largest |Δlogit| of a 12-token
prefill plus 8 single-token decode steps through ONNX Runtime against transformers' full forward (eager).
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import numpy as np
import torch

_STATE: dict = {}


def _gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                   sliding_window=None, **kwargs):
    b, heads, s, d = query.shape
    kv = key.shape[1]
    past_k, past_v, seqlens, total = _STATE["past"][module.layer_idx]
    q = query.transpose(1, 2).reshape(b, s, heads * d)
    k = key.transpose(1, 2).reshape(b, s, kv * d)
    v = value.transpose(1, 2).reshape(b, s, kv * d)
    attrs = {"num_heads": heads, "kv_num_heads": kv, "scale": float(scaling if scaling is not None else d ** -0.5)}
    if softcap:
        attrs["softcap"] = float(softcap)
    if sliding_window:
        attrs["local_window_size"] = int(sliding_window)
    t = past_k.shape[2] + s
    out, present_k, present_v = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention", [q, k, v, past_k, past_v, seqlens, total], attrs,
        dtypes=[q.dtype] * 3, shapes=[q.shape, [b, kv, t, d], [b, kv, t, d]], version=1)
    _STATE["present"][module.layer_idx] = (present_k, present_v)
    return out.view(b, s, heads, d), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("qcompiler_gqa", _gqa_attention)
    AttentionMaskInterface.register("qcompiler_gqa", lambda *args, **kwargs: None)


def _wrapper(model, layers: int):
    from transformers import DynamicCache

    class _NewOnly(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return key_states, value_states

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            seqlens = (attention_mask.sum(1) - 1).to(torch.int32)
            total = torch.tensor(attention_mask.shape[1], dtype=torch.int32)
            _STATE["past"] = [(past[2 * i], past[2 * i + 1], seqlens, total) for i in range(layers)]
            _STATE["present"] = [None] * layers
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=_NewOnly(), use_cache=True)
            return (out.logits, *[t for pair in _STATE["present"] for t in pair])

    return Wrapper()


def probe(kind: str, folder: Path) -> tuple[int, float]:
    import onnx
    import onnxruntime as ort
    from torch.export import Dim

    from tests.helpers import tiny_model

    model, reference = tiny_model(kind), tiny_model(kind)
    for module in model.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "qcompiler_gqa"
    cfg = model.config
    n, kv = cfg.num_hidden_layers, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    args = (torch.randint(0, 120, (1, 4)), torch.ones(1, 7, dtype=torch.int64), torch.arange(3, 7)[None],
            *[torch.randn(1, kv, 3, d) for _ in range(2 * n)])
    s, p, t = Dim("sequence_length"), Dim("past_sequence_length"), Dim("total_sequence_length")
    shapes = {"input_ids": {1: s}, "attention_mask": {1: t}, "position_ids": {1: s},
              "past": tuple({2: p} for _ in range(2 * n))}
    path = folder / f"{kind}.onnx"
    with torch.no_grad():
        torch.onnx.export(_wrapper(model, n), args, dynamo=True, dynamic_shapes=shapes, opset_version=18).save(str(path))
    nodes = collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    assert nodes["GroupQueryAttention"] == n, nodes
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    ids = np.random.default_rng(1).integers(0, 120, size=(1, 20))

    def feeds(chunk, start, past):
        values = [chunk, np.ones((1, start + chunk.shape[1]), np.int64),
                  np.arange(start, start + chunk.shape[1])[None].astype(np.int64)]
        values += past if past is not None else [np.zeros((1, kv, 0, d), np.float32)] * (2 * n)
        return dict(zip(names, values))

    out = sess.run(None, feeds(ids[:, :12], 0, None))
    steps = [out[0]]
    for pos in range(12, 20):
        out = sess.run(None, feeds(ids[:, pos:pos + 1], pos, out[1:]))
        steps.append(out[0])
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids)).logits.numpy()
    return sum(nodes.values()), float(np.abs(np.concatenate(steps, axis=1) - ref).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kinds", nargs="*", default=["llama", "qwen3", "gemma2", "mistral-swa"])
    args = ap.parse_args()
    _register()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            nodes, err = probe(kind, Path(tmp))
            print(f"{kind}: {nodes} nodes, prefill 12 + 8 decode steps vs transformers: max |Δlogit| {err:.2e}")


if __name__ == "__main__":
    main()
