"""`fold-affine-into-norm`: fold the activation side of each AffineQuant norm transform into the norm.

Before (as exported, `qcompiler/graph/export_affine.py`):  norm → [Add pre] → Mul inv → Mul fwd → [Add post] → linears
After, diagonal transform:  norm(weight ⊙ inv, (bias + pre) ⊙ inv) → Mul fwd → [Add post] → linears; an RMSNorm has
no bias to hold the shift, so `pre ⊙ inv` stays as `Add {norm}/affine/leftover`, which `fold-affine-into-linear`
folds into the linears' biases (never dropped).
After, full matrix (`--ln-matrix`): the shift goes into a LayerNorm bias (an RMSNorm keeps `Add {norm}/affine/shift`)
and `MatMul {norm}/affine/matrix` stays: a `[K, K]` matrix cannot live in an elementwise norm.

The math is `qcompiler.graph.fold.fold_into_norm`, the function the PyTorch merge uses.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir

from qcompiler.graph import edit
from qcompiler.graph.edit import const, const_input, const_of, data_input, fresh_name, in_module, make_node, set_const
from qcompiler.graph.fold import fold_into_norm

from .base import Pass, PassError, PassResult


def norm_params(value: ir.Value, norm: str) -> tuple[ir.Node, int, int]:
    """The node computing `norm`'s output `value` and the input slots of its weight and bias (−1: none):
    LayerNormalization (scale, bias) or RMSNorm's final `Mul` by a constant weight."""
    node = value.producer()
    if node is not None and node.op_type == "LayerNormalization":
        bias = 2 if len(node.inputs) > 2 and edit.is_const(node.inputs[2]) else -1
        if not edit.is_const(node.inputs[1]):
            raise PassError(f"{norm}: LayerNormalization scale is not a constant")
        return node, 1, bias
    if node is not None and node.op_type == "Mul" and in_module(node, norm):
        k, _ = const_input(node)
        if k is not None:
            return node, k, -1
    found = "a graph input" if node is None else f"{node.op_type} {node.name}"
    raise PassError(f"{norm}: expected LayerNormalization or RMSNorm's weight Mul before its transform, found {found}")


class FoldAffineIntoNorm(Pass):
    """Fold `manifest["affine"]` norm transforms into their norms (see the module docstring)."""

    name = "fold-affine-into-norm"
    preserves_outputs: ClassVar[bool] = True

    def __init__(self, manifest: dict):
        self.manifest = manifest

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        counts = {"folded": 0, "matrices_kept": 0, "shift_kept": 0}
        notes: list[str] = []
        removed = 0
        for t in self.manifest.get("affine", []):
            if t["kind"] != "norm" or t.get("folded_norm"):
                continue
            norm, roles = t["norm"], t["nodes"]
            nodes = {r: edit.find_node(graph, name) for r, name in roles.items()}
            inv = nodes["inv"]
            pre = nodes.get("pre")
            norm_out = data_input(pre if pre is not None else inv)
            if norm_out.name != t["norm_output"]:
                raise PassError(f"{norm}: transform no longer reads the norm output {t['norm_output']}")
            nnode, w_slot, b_slot = norm_params(norm_out, norm)
            w = const(nnode.inputs[w_slot])
            b = const(nnode.inputs[b_slot]) if b_slot >= 0 else None
            P = const_of(inv)
            shift = const_of(pre) if pre is not None else None
            if t["matrix"]:
                if shift is not None and b is not None:
                    _, new_b, _ = fold_into_norm(_t(w), _t(b), _t(np.ones_like(w)), _t(shift))
                    nnode.replace_input_with(b_slot, set_const(graph, fresh_name(graph, f"{norm}.bias"),
                                                               new_b.numpy(), like=nnode.inputs[b_slot]))
                    edit.bypass(graph, pre, norm_out)
                    removed += 1
                    del roles["pre"]
                elif shift is not None:
                    pre.name = f"{norm}/affine/shift"
                    _own_const(graph, pre, f"{norm}.affine_shift", shift)
                    roles["shift"] = roles.pop("pre")
                    counts["shift_kept"] += 1
                inv.name = f"{norm}/affine/matrix"
                _own_const(graph, inv, f"{norm}.affine_matrix", P)
                roles["matrix"] = roles.pop("inv")
                counts["matrices_kept"] += 1
                notes.append(f"{norm}: {P.shape[0]}x{P.shape[1]} matrix kept ({P.nbytes / 1e6:.2f} MB)")
            else:
                new_w, new_b, leftover = fold_into_norm(_t(w), None if b is None else _t(b), _t(P),
                                                        None if shift is None else _t(shift))
                nnode.replace_input_with(w_slot, set_const(graph, fresh_name(graph, f"{norm}.weight"),
                                                           new_w.numpy(), like=nnode.inputs[w_slot]))
                if b is not None:
                    nnode.replace_input_with(b_slot, set_const(graph, fresh_name(graph, f"{norm}.bias"),
                                                               new_b.numpy(), like=nnode.inputs[b_slot]))
                if pre is not None:
                    edit.bypass(graph, pre, norm_out)
                    removed += 1
                    del roles["pre"]
                edit.bypass(graph, inv, norm_out)
                removed += 1
                del roles["inv"]
                if leftover is not None:
                    value = set_const(graph, fresh_name(graph, f"{norm}.affine_leftover"), leftover.numpy())
                    add = make_node("Add", [norm_out, value], fresh_name(graph, f"{norm}/affine/leftover_out"),
                                    f"{norm}/affine/leftover", norm)
                    edit.insert_after(graph, norm_out, add)
                    roles["leftover"] = add.name
            t["folded_norm"] = True
            counts["folded"] += 1
        edit.commit(graph)
        counts["removed_nodes"] = removed
        return PassResult(model=model, modified=counts["folded"] > 0, counts=counts, notes=notes)

    def ensures(self, model: ir.Model, result: PassResult) -> None:
        names = {n.name for n in model.graph}
        for t in self.manifest.get("affine", []):
            if t["kind"] == "norm":
                for role in ("pre", "inv"):
                    if role in t["nodes"] or f"{t['norm']}/affine/{role}" in names:
                        raise PassError(f"{t['norm']}: transform node '{role}' left after folding")


def _own_const(graph: ir.Graph, node: ir.Node, name: str, value: np.ndarray) -> None:
    """Point `node`'s constant input at an initializer of its own called `name` (what the loaders look for)."""
    k, _ = const_input(node)
    if node.inputs[k].name != name:
        node.replace_input_with(k, set_const(graph, name, value))


def _t(a):
    import torch

    return torch.from_numpy(np.array(a))
