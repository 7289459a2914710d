"""Torch → ONNX export of a causal LM with KV cache, plus the manifest mapping weight initializers to modules.

Graph interface (what `qcompiler eval`, `generate` and onnxruntime-genai rely on):

    inputs   input_ids [batch, seq] int64, attention_mask [batch, total] int64, position_ids [batch, seq] int64,
             past_key_values.{i}.key / .value  [batch, kv_heads, past, head_dim]   (past may be 0)
    outputs  logits [batch, seq, vocab], present.{i}.key / .value  [batch, kv_heads, total, head_dim]

The exporter (torch.onnx dynamo) records each node's module path in `metadata_props["namespace"]`. We use it,
plus a value check against the PyTorch weight, to name each linear's weight initializer after its module
(`model.layers.0.self_attn.q_proj.weight_t`, holding `weight.T`) and to write the manifest that passes consume.
Matching is structural (a MatMul whose second input is a constant), never by exporter-generated tensor names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import tempfile
import warnings
from typing import Optional

import numpy as np
import onnx
import torch

from qcompiler import QCompilerError
from qcompiler.graph.edit import rename_tensors
from qcompiler.graph.external import tensor_array

log = logging.getLogger(__name__)

WEIGHT_SUFFIX = ".weight_t"
BIAS_SUFFIX = ".bias"


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Shapes of the KV cache: `[batch, num_kv_heads, seq, head_dim]` per layer, for key and value."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "KVLayout":
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(num_layers=cfg.num_hidden_layers, num_kv_heads=kv, head_dim=head_dim)

    def input_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def empty_past(self, batch: int, dtype=np.float32) -> dict[str, np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, dtype=dtype) for name in self.input_names()}


class KVCacheWrapper(torch.nn.Module):
    """Flat-tensor interface around a HF causal LM: `(ids, mask, pos, *past) -> (logits, *present)`."""

    # torch.onnx writes the wrapper's qualified class name into every node's `namespace` metadata (what Netron shows
    # as the node's module path): "qcompiler.export.KVCacheWrapper/model: ...". The name is part of the graph, so it
    # stays the one exports have always carried, wherever this module lives.
    __module__ = "qcompiler.export"

    def __init__(self, model: torch.nn.Module, layout: KVLayout, *, fused_attention: bool = False):
        super().__init__()
        self.model = model
        self.layout = layout
        self.fused_attention = fused_attention
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layout.num_layers)]
        if self.fused_attention:
            from qcompiler.graph.gqa import AttentionStep, attention_step, new_only_cache

            with attention_step(AttentionStep(pairs, attention_mask)) as step:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=True, **{self._cache_kw: new_only_cache()})
            return (out.logits, *step.presents())
        # No config: every layer a full `DynamicLayer`. With the config, transformers makes a sliding-window layer's
        # cache drop keys older than the window, so its present would be shorter than the others' (the graph's one
        # past_sequence_length); the sliding-window mask, built from absolute positions, then hides those keys.
        cache = DynamicCache(pairs)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kw: cache},
        )
        new_cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        present = []
        for layer in new_cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


@dataclasses.dataclass
class ExportResult:
    """What `export_model` produced.

    Attributes:
        model: the ONNX model (weights inline, or with `borrow_weights` borrowed from `weights`' folder; written
            with external data by `emit`).
        manifest: `{"linears": {module_path: {"weight": init_name, "bias": init_name | None,
                   "in_features": K, "out_features": N}}, "kv": {...}}`.
        weights: with `borrow_weights`, the temporary folder holding the exporter's data file; it is removed when
            this result is released, so keep the result until the model has been saved.
    """

    model: onnx.ModelProto
    manifest: dict
    weights: Optional[tempfile.TemporaryDirectory] = None


def _linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _namespace_module(node: onnx.NodeProto) -> Optional[str]:
    """Module path of the innermost `nn.Linear` in a node's `namespace` metadata, or None."""
    for prop in node.metadata_props:
        if prop.key != "namespace":
            continue
        scopes = [s.strip() for s in prop.value.split("/")]
        for scope in reversed(scopes):
            name, _, cls = scope.partition(":")
            if cls.strip().endswith("torch.nn.modules.linear.Linear"):
                return name.strip()
    return None


def export_model(
    model: torch.nn.Module,
    *,
    opset: int = 18,
    sample_seq: int = 4,
    sample_past: int = 3,
    transforms: Optional[list] = None,
    borrow_weights: bool = False,
    fused_attention: bool = False,
    per_layer: bool = True,
) -> ExportResult:
    """Export `model` (a HF causal LM, eval mode, fp32 or fp16) with KV cache; rename linear weights; build manifest.

    `transforms`: `AffineTransforms.manifest()` of transforms installed on `model` (`AffineTransforms.install`); their
    nodes are found, named `{module}/affine/...` and listed in `manifest["affine"]` for the fold passes.
    `borrow_weights`: leave the weights in the exporter's data file (`qcompiler.graph.external`) instead of loading them
    into the proto, which would hold a second copy of the model next to PyTorch's; passes read them from there.
    `fused_attention`: each attention as one `com.microsoft::GroupQueryAttention` (`qcompiler.graph.gqa`) instead of
    the modeling code's standard ops (heads whose size is not a multiple of 16 keep standard ops, with a warning).
    `per_layer`: trace one decoder layer per kind and stamp it out (`qcompiler.graph.stamp`), where it applies (not
    with `transforms`); False: trace the whole model.
    """
    layout = KVLayout.from_config(model.config)
    if fused_attention:
        from qcompiler.graph.gqa import HEAD_SIZE_MULTIPLE, supported

        if not supported(layout.head_dim):
            log.warning("head size %d is not a multiple of %d (ONNX Runtime's GroupQueryAttention needs it): "
                        "attention stays in standard ops", layout.head_dim, HEAD_SIZE_MULTIPLE)
            fused_attention = False
    dtype = next(model.parameters()).dtype
    proto = weights = None
    plan = None
    if per_layer and not transforms:
        from qcompiler.graph.stamp import plan_for

        plan = plan_for(model)
    if plan is not None:
        from qcompiler.graph.stamp import CannotStamp, stamp, template

        try:
            with template(model, plan) as traced:
                proto, weights = _trace(model, dataclasses.replace(layout, num_layers=traced.layers), opset=opset,
                                        sample_seq=sample_seq, sample_past=sample_past, borrow_weights=borrow_weights,
                                        fused_attention=fused_attention)
            stamp(proto, plan, model, traced, folder=weights.name if weights is not None else None)
            log.info("export: traced %d of %d decoder layers, stamped out the rest", len(plan.templates),
                     len(plan.kind_of))
        except CannotStamp as e:
            log.info("export: per-layer construction does not apply (%s); tracing the whole model", e)
            if weights is not None:
                weights.cleanup()
            proto = weights = None
    if proto is None:
        proto, weights = _trace(model, layout, opset=opset, sample_seq=sample_seq, sample_past=sample_past,
                                borrow_weights=borrow_weights, fused_attention=fused_attention)
    _name_dims(proto, layout)
    manifest = _build_manifest(proto, model)
    if transforms:
        from qcompiler.graph.export_affine import tag_transforms

        manifest["affine"] = tag_transforms(proto, manifest, transforms)
    manifest["kv"] = dataclasses.asdict(layout)
    manifest["dtype"] = str(dtype).replace("torch.", "")
    return ExportResult(model=proto, manifest=manifest, weights=weights)


def _trace(model: torch.nn.Module, layout: KVLayout, *, opset: int, sample_seq: int, sample_past: int,
           borrow_weights: bool, fused_attention: bool
           ) -> tuple[onnx.ModelProto, Optional[tempfile.TemporaryDirectory]]:
    """`torch.onnx.export(dynamo=True)` of `model` behind the flat KV-cache interface: the proto, and with
    `borrow_weights` the temporary folder its weights are borrowed from (else None: weights inline)."""
    wrapper = KVCacheWrapper(model, layout, fused_attention=fused_attention).eval()
    dtype = next(model.parameters()).dtype
    batch = 2
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, sample_seq), generator=g)
    mask = torch.ones(batch, sample_past + sample_seq, dtype=torch.int64)
    pos = torch.arange(sample_past, sample_past + sample_seq).expand(batch, sample_seq).contiguous()
    past = tuple(
        torch.randn(batch, layout.num_kv_heads, sample_past, layout.head_dim, generator=g).to(dtype)
        for _ in range(2 * layout.num_layers)
    )
    from torch.export import Dim

    b, s, p, t = Dim("batch"), Dim("sequence_length"), Dim("past_sequence_length"), Dim("total_sequence_length")
    dynamic_shapes = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        "past": tuple({0: b, 2: p} for _ in range(2 * layout.num_layers)),
    }
    input_names = ["input_ids", "attention_mask", "position_ids", *layout.input_names()]
    output_names = ["logits", *layout.output_names()]
    # "torchvision is not installed. Skipping torchvision::nms" etc.: irrelevant to LLMs, printed on every export.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    weights = tempfile.TemporaryDirectory(prefix="qcompiler-export-")
    tmp = weights.name
    if fused_attention:
        from qcompiler.graph.gqa import fused_attention as attention_context
    else:
        attention_context = _unchanged
    with warnings.catch_warnings(), _module_attributes_kept(model), attention_context(model):
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "model.onnx")
        try:
            with torch.no_grad():
                torch.onnx.export(
                    wrapper,
                    (ids, mask, pos, *past),
                    path,
                    dynamo=True,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_shapes=dynamic_shapes,
                    external_data=True,
                    verbose=False,
                )
        except Exception as e:  # the exporter's own report is long; keep its first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            weights.cleanup()
            raise QCompilerError(f"torch.onnx export failed: {first}") from e
        proto = onnx.load(path, load_external_data=not borrow_weights)
    if borrow_weights:
        from qcompiler.graph.external import borrow

        borrow(proto, tmp)
        return proto, weights
    weights.cleanup()
    return proto, None


@contextlib.contextmanager
def _module_attributes_kept(model: torch.nn.Module):
    """Restore every module's plain attributes after tracing. Modeling code may cache tensors on a module during
    its forward (transformers' longrope rotary keeps `long_inv_freq`); under the exporter's trace those are fake
    tensors, and a model left holding them computes wrong values afterwards (the validation's PyTorch reference)."""
    saved = {m: dict(vars(m)) for m in model.modules()}
    try:
        yield
    finally:
        for module, attrs in saved.items():
            state = vars(module)
            for key in [k for k in state if k not in attrs]:
                del state[key]
            for key, value in attrs.items():
                if state.get(key, _MISSING) is not value:
                    state[key] = value


_MISSING = object()


@contextlib.contextmanager
def _unchanged(model):
    yield


def _name_dims(proto: onnx.ModelProto, layout: KVLayout) -> None:
    """Give graph outputs readable symbolic dims (the exporter leaves some anonymous)."""
    names = {"logits": ["batch", "sequence_length", None]}
    for n in layout.output_names():
        names[n] = ["batch", layout.num_kv_heads, "total_sequence_length", layout.head_dim]
    for out in proto.graph.output:
        dims = names.get(out.name)
        if dims is None or not out.type.tensor_type.HasField("shape"):
            continue
        for d, want in zip(out.type.tensor_type.shape.dim, dims):
            if isinstance(want, str):
                d.ClearField("dim_value")
                d.dim_param = want


def _build_manifest(proto: onnx.ModelProto, model: torch.nn.Module) -> dict:
    """Find each Linear's node (MatMul with constant B = weight.T, or Gemm with transB=1), rename its weight
    initializer after the module, and return the manifest. Weights are checked against PyTorch values."""
    linears = _linear_modules(model)
    inits = {t.name: t for t in proto.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    renames: dict[str, str] = {}
    entries: dict[str, dict] = {}
    mismatched: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        module = _namespace_module(node)
        if module is None:
            continue
        if module.startswith("model.") and module[len("model."):] in linears:
            module = module[len("model."):]  # strip the KVCacheWrapper's attribute name
        lin = linears.get(module)
        if lin is None or module in entries:
            continue
        if node.op_type == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or not attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0:
                continue
            if len(node.input) > 2 and node.input[2] and attrs.get("beta", 1.0) != 1.0:
                continue
            layout, ref = "NxK", lin.weight.detach().float().numpy()
        else:
            layout, ref = "KxN", lin.weight.detach().float().numpy().T
        w_name = node.input[1]
        w = tensor_array(inits[w_name]).astype(np.float32)
        if w.shape != ref.shape or not np.array_equal(w, ref.astype(inits_dtype(inits[w_name])).astype(np.float32)):
            mismatched.setdefault(module, node.op_type)  # another node of the module (e.g. a transform) may match
            continue
        entry = {
            "op": node.op_type,
            "node": node.name,
            "weight": w_name,
            "weight_layout": layout,
            "bias": None,
            "in_features": lin.in_features,
            "out_features": lin.out_features,
        }
        if len(consumers.get(w_name, [])) == 1:  # shared (tied) weights keep their name
            entry["weight"] = renames[w_name] = module + (WEIGHT_SUFFIX if layout == "KxN" else ".weight")
        if lin.bias is not None:
            bias_name = _find_bias(node, consumers, inits)
            if bias_name is not None:
                b = tensor_array(inits[bias_name]).astype(np.float32)
                if b.shape == (lin.out_features,) and np.allclose(b, lin.bias.detach().float().numpy()):
                    entry["bias"] = bias_name
                    if len(consumers.get(bias_name, [])) == 1:
                        entry["bias"] = renames[bias_name] = module + BIAS_SUFFIX
        entries[module] = entry
    for module, op in mismatched.items():
        if module not in entries:
            raise QCompilerError(f"export: the {op} weight for {module} does not match the PyTorch weight")
    rename_tensors(proto, renames)
    return {"linears": entries}


def inits_dtype(t: onnx.TensorProto):
    return onnx.helper.tensor_dtype_to_np_dtype(t.data_type)


def _find_bias(node: onnx.NodeProto, consumers: dict, inits: dict) -> Optional[str]:
    """The constant bias of a linear: Gemm's C input, or the other input of a MatMul's sole Add consumer."""
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        return node.input[2] if node.input[2] in inits else None
    users = consumers.get(node.output[0], [])
    if len(users) == 1 and users[0].op_type == "Add":
        other = [i for i in users[0].input if i != node.output[0]]
        if len(other) == 1 and other[0] in inits:
            return other[0]
    return None
