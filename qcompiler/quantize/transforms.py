"""Learned invertible transforms (AffineQuant) as data: exported as explicit graph nodes, or merged into PyTorch.

Two kinds, both exact rewrites of the full-precision model:

- `NormTransform`: a norm feeding linears (input_layernorm → q/k/v, post-attention norm → gate/up or fc1). The
  norm output `y` becomes `x̃ = (y − δ) @ A⁻¹` and each linear's weight `W' = A W` (`[K, N]` layout) with bias
  `b + δ W`. `A` is a vector (diagonal, the default) or a `[K, K]` matrix (`--ln-matrix`); `δ` (the shift) only where
  the family has one.
- `HeadTransform`: value → output projection, one `[d, d]` block `A_g` per KV head: `v' = v @ A⁻¹` (v_proj's
  `W A⁻¹`, `b A⁻¹`) and o_proj's weight `A W` (the block of KV head `g` repeated for the query heads that read it:
  attention mixes value rows, so it commutes with a right factor per head).

`TransformPlan` is what a transform method (`Method.learns_transforms`) hands the export: the transforms of the whole
model plus the full-precision state the merge replaced, from which `full_precision_model` / `export_copy` rebuild the
model to export, and the weights the graph must hold once folded.

`install` puts both factors into the full-precision model as buffers and hooks, so the exported graph carries each
transform as explicit nodes next to the weights they fold into (numerically the full-precision model); the passes
`fold-affine-into-norm` / `fold-affine-into-linear` then fold them. `merge` does the same folds in PyTorch with the
same functions (qcompiler/graph/fold.py) and the same float32 factors, so both end with bit-identical weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional

import numpy as np
import torch

from qcompiler import QCompilerError
from qcompiler.graph import fold
from qcompiler.models.families import Family, fused_linear, get_module
from qcompiler.models.offload import copy_model

# buffer names of the explicit transform nodes (the exporter names initializers after them)
PRE, P, Q, POST = "affine_pre", "affine_inv", "affine_fwd", "affine_post"
OUT, IN = "affine_out", "affine_in"
# initializer names the fold passes leave for what stays in the graph
NORM_MATRIX, NORM_SHIFT = "affine_matrix", "affine_shift"


def _norm_out(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, (tuple, list)) else y


@dataclasses.dataclass
class NormTransform:
    """`A` (vector `[K]` or matrix `[K, K]`) and optional shift `δ [K]` between `norm` and `linears` (module paths);
    `weight_offset`: the norm's `Norm.weight_offset` (Gemma: 1.0), which the PyTorch merge keeps out of the scaling."""

    norm: str
    linears: tuple[str, ...]
    A: torch.Tensor
    shift: Optional[torch.Tensor] = None
    weight_offset: float = 0.0

    @property
    def matrix(self) -> bool:
        return self.A.dim() == 2

    def factors(self) -> dict[str, Optional[torch.Tensor]]:
        """The float32 tensors stored in the graph: `pre = −δ`, `P = A⁻¹` (float64 inverse), `Q = A`, `post = δ`."""
        shift = None if self.shift is None else self.shift.detach().float()
        return {
            PRE: None if shift is None else -shift,
            P: fold.inverse64(self.A),
            Q: self.A.detach().float().contiguous(),
            POST: shift,
        }


@dataclasses.dataclass
class HeadTransform:
    """Per-KV-head blocks `A [kv_heads, d, d]` between `v` (output side: `@ A⁻¹`) and `o` (input side: `A`, blocks
    repeated `repeat` = query heads per KV head)."""

    v: str
    o: str
    blocks: torch.Tensor
    repeat: int = 1

    def factors(self) -> dict[str, torch.Tensor]:
        a = self.blocks.detach().float()
        return {OUT: fold.block_diag_heads(fold.blocks_inverse64(a)), IN: fold.block_diag_heads(a, self.repeat)}


@dataclasses.dataclass
class AffineTransforms:
    """All transforms of a model (paths are full module paths, e.g. `model.layers.0.input_layernorm`)."""

    norms: list[NormTransform] = dataclasses.field(default_factory=list)
    heads: list[HeadTransform] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.norms or self.heads)

    # ------------------------------------------------------------------------------------------ export form
    def install(self, model: torch.nn.Module) -> list:
        """Register each transform's factors as buffers and hooks on the full-precision `model` (for export).
        Returns the hook handles (`handle.remove()` undoes the hooks; the buffers stay, unused)."""
        handles = []
        for t in self.norms:
            norm = get_module(model, t.norm)
            f = t.factors()
            for name, value in f.items():
                if value is not None:
                    norm.register_buffer(name, value.clone(), persistent=False)
            handles.append(norm.register_forward_hook(_norm_hook(t.matrix, f[PRE] is not None, f[POST] is not None)))
        for h in self.heads:
            v, o = get_module(model, h.v), get_module(model, h.o)
            f = h.factors()
            v.register_buffer(OUT, f[OUT], persistent=False)
            o.register_buffer(IN, f[IN], persistent=False)
            handles.append(v.register_forward_hook(lambda mod, args, y: y @ getattr(mod, OUT)))
            handles.append(o.register_forward_pre_hook(lambda mod, args: (args[0] @ getattr(mod, IN), *args[1:])))
        return handles

    def manifest(self) -> list[dict[str, Any]]:
        """What the fold passes need to find the nodes (they read the values from the graph)."""
        out: list[dict[str, Any]] = []
        for t in self.norms:
            out.append({"kind": "norm", "norm": t.norm, "linears": list(t.linears), "matrix": t.matrix,
                        "shift": t.shift is not None})
        for h in self.heads:
            out.append({"kind": "heads", "v": h.v, "o": h.o, "heads": int(h.blocks.shape[0]),
                        "head_dim": int(h.blocks.shape[1]), "repeat": h.repeat})
        return out

    # ------------------------------------------------------------------------------------------ merged form
    def merged_weights(self, model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Each transformed linear's folded `(weight [N, K], bias [N] | None)` computed from `model`'s current
        (full-precision) weights, without changing the model."""
        out: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

        def current(path):
            if path in out:
                w, b = out[path]
                return w.T, b
            lin = get_module(model, path)
            return lin.weight.detach().float().T, None if lin.bias is None else lin.bias.detach().float()

        for t in self.norms:
            f = t.factors()
            norm = get_module(model, t.norm)
            has_bias = getattr(norm, "bias", None) is not None
            leftover = None
            if not t.matrix and f[PRE] is not None and not has_bias:
                _, _, leftover = fold.fold_into_norm(norm.weight, None, f[P], f[PRE])
            for path in t.linears:
                W, b = current(path)
                W, b = fold.fold_linear_input(W, b, f[Q], pre=leftover, post=f[POST])
                out[path] = (W.T.contiguous(), b)
        for h in self.heads:
            f = h.factors()
            W, b = current(h.v)
            W, b = fold.fold_linear_output(W, b, f[OUT])
            out[h.v] = (W.T.contiguous(), b)
            W, b = current(h.o)
            W, b = fold.fold_linear_input(W, b, f[IN])
            out[h.o] = (W.T.contiguous(), b)
        return out

    def merge_norms(self, model: torch.nn.Module) -> list:
        """Fold each transform's norm side into `model` in place (diagonal: into the norm's weight/bias; a matrix
        stays as a hook after the norm, with the shift when the norm has no bias, exactly as the passes leave it).
        Returns the hook handles."""
        handles = []
        for t in self.norms:
            f = t.factors()
            norm = get_module(model, t.norm)
            bias = getattr(norm, "bias", None)
            with torch.no_grad():
                if t.matrix:
                    if f[PRE] is not None and bias is not None:  # the shift into the bias; P stays a matrix
                        _, b, _ = fold.fold_into_norm(norm.weight, bias, torch.ones_like(bias), f[PRE])
                        bias.copy_(b)
                        pre = None
                    else:
                        pre = f[PRE]
                    handles.append(attach_norm_residue(norm, matrix=f[P], shift=pre))
                    continue
                # a shift a bias-free norm cannot hold is folded into the linears' biases (`merged_weights`)
                w, b, _ = fold.fold_into_norm(norm.weight, bias, f[P], f[PRE], offset=t.weight_offset)
                norm.weight.copy_(w)
                if bias is not None:
                    bias.copy_(b)
        return handles


@dataclasses.dataclass
class TransformPlan(AffineTransforms):
    """The learned transforms of a whole model (`norms`, `heads`: see `AffineTransforms`) and what the export needs
    besides them; `QuantizationResult.transforms` of a method with `learns_transforms` (AffineQuant).

    Attributes:
        fp_state: parameter path → full-precision value before the merge (None: a bias the merge added), to rebuild
            the full-precision model for export (`full_precision_model`).
        expected / expected_bias: module path of every transformed linear → `[N, K]` float32 weight / `[N]` bias the
            graph holds after folding (the weight the quantizer was given), checked by replace-linear.
    """

    fp_state: dict[str, Optional[torch.Tensor]] = dataclasses.field(default_factory=dict)
    expected: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    expected_bias: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def full_precision_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of the merged (quantized) `model` with its full-precision parameters back and the merge's hooks
        and buffers removed: the model the transforms are installed on for export. The forward pre-hooks of every
        transformed linear (activation fake quantization, w4a4: the graph gets it from a pass) are dropped."""
        fp = copy_model(model)  # offloaded models: the copy's weights are file pages too
        modules = dict(fp.named_modules())
        with torch.no_grad():
            for name, value in self.fp_state.items():
                module_path, _, attr = name.rpartition(".")
                module = modules[module_path]
                if value is None:
                    setattr(module, attr, None)
                else:
                    getattr(module, attr).copy_(value)
        for path in self.expected:
            modules[path]._forward_pre_hooks.clear()
        for t in self.norms:
            norm = modules[t.norm]
            norm._forward_hooks.clear()
            for buf in (NORM_MATRIX, NORM_SHIFT):
                norm._buffers.pop(buf, None)
        return fp

    @contextlib.contextmanager
    def export_copy(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """`with plan.export_copy(model) as fp_model:` the full-precision model with the transforms installed as
        explicit nodes (`install`), to export with `manifest()`; the hooks are removed on exit."""
        fp = self.full_precision_model(model)
        handles = self.install(fp)
        try:
            yield fp
        finally:
            for h in handles:
                h.remove()


def attach_norm_residue(norm: torch.nn.Module, *, matrix: Optional[torch.Tensor], shift: Optional[torch.Tensor]):
    """What stays after a norm once its transform is folded: `y ↦ (y + shift) @ matrix` (either part optional)."""
    if shift is not None:
        norm.register_buffer(NORM_SHIFT, shift.detach().float().clone(), persistent=False)
    if matrix is not None:
        norm.register_buffer(NORM_MATRIX, matrix.detach().float().clone(), persistent=False)

    def hook(mod, args, y):
        y = _norm_out(y)
        if shift is not None:
            y = y + getattr(mod, NORM_SHIFT)
        if matrix is not None:
            y = y @ getattr(mod, NORM_MATRIX)
        return y

    return norm.register_forward_hook(hook)


def _norm_hook(matrix: bool, pre: bool, post: bool):
    def hook(mod, args, y):
        y = _norm_out(y)
        if pre:
            y = y + getattr(mod, PRE)
        y = y @ getattr(mod, P) if matrix else y * getattr(mod, P)
        y = y @ getattr(mod, Q) if matrix else y * getattr(mod, Q)
        if post:
            y = y + getattr(mod, POST)
        return y

    return hook


def head_pair(family: Family) -> Optional[tuple[str, str]]:
    """The (value, output) projections of the per-KV-head transform, or None when the value projection is fused
    with q and k (Phi-3's `qkv_proj`): its transform would act on the v rows of the fused linear only, and the graph
    holds one MatMul for all three, so AffineQuant learns the norm → linears transforms (and the clipping) there and
    no value → output transform."""
    return None if fused_linear(family, family.v_o[0]) is not None else family.v_o


def identity_transforms(model: torch.nn.Module, family: Family, *, matrix: bool = False,
                        shift: bool = False) -> AffineTransforms:
    """Identity transforms at every place the family allows (a starting point and a test fixture)."""
    from qcompiler.models.families import iter_layers

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    out = AffineTransforms()
    for path, layer in iter_layers(model, family):
        for norm, linears in family.norm_linears:
            K = get_module(layer, linears[0]).in_features
            A = torch.eye(K) if matrix else torch.ones(K)
            out.norms.append(NormTransform(norm=f"{path}.{norm}", linears=tuple(f"{path}.{n}" for n in linears),
                                           A=A, shift=torch.zeros(K) if shift else None,
                                           weight_offset=family.norm.weight_offset))
        pair = head_pair(family)
        if pair is not None:
            v, o = pair
            out.heads.append(HeadTransform(v=f"{path}.{v}", o=f"{path}.{o}",
                                           blocks=torch.eye(head_dim).repeat(kv, 1, 1), repeat=heads // kv))
    return out
