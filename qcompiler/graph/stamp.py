"""Per-layer graph construction: trace one decoder layer of each kind, then stamp it out for every layer.

Tracing a causal LM with `torch.onnx.export(dynamo=True)` costs about a fixed 8 s plus 4–5 s per decoder layer on
this project's 2-core machine (160 s for SmolLM2-135M's 30 layers), whatever the layer's width. Decoder layers of
one kind (same attention record and layer type, same parameter names and shapes) trace to the same nodes, so the
exporter traces a *template*: the model with only the first layer of each kind (`StampPlan`), each layer's input
and output marked by a `qcompiler.stamp::LayerInput` / `LayerOutput` node (`torch.onnx.ops.symbolic`), with the
template's own embeddings, masks, rotary tables, final norm and head. `stamp` then builds the full graph:

- the template's nodes outside every layer (the prefix: embeddings, mask, rotary tables, shapes; the suffix: the
  final norm and the lm_head) once;
- per decoder layer `i`, a copy of its kind's layer nodes: tensors made inside the layer renamed `layers.{i}.{name}`,
  the layer input bound to the previous copy's output, `past_key_values.{p}.*` / `present.{p}.*` to layer `i`'s, the
  layer's weights replaced by layer `i`'s (from PyTorch, with the transform the exporter applied to the template's:
  as is, transposed, or plus a constant, as Gemma's `1 + weight` norms), node names and `namespace` metadata moved to
  the layer's module path, so the manifest and Netron see each layer as in a full trace.

A template layer's nodes are those that depend on its input, its past key/value (other than through a `Shape`: the
batch and past lengths are one symbol across layers) or its weights, and that its output or presents depend on.
The result is numerically identical to a full trace (the same nodes per layer; only dimension reads and names
differ; tests/test_stamp.py compares both in ONNX Runtime on every family's tiny config). Where anything does not
fit — a parameter of the template's layers that no initializer carries, a large constant inside a layer that is
not a weight, nodes between two layers — `stamp` raises `CannotStamp` and the exporter traces the whole model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Iterator, Optional

import numpy as np
import onnx
import torch

from qcompiler.graph.external import file_tensor, goes_external, spill, tensor_array

DOMAIN = "qcompiler.stamp"
MARK_IN, MARK_OUT = "LayerInput", "LayerOutput"
SMALL_CONSTANT = 64  # elements: larger unnamed constants inside a layer must be one of its weights


class CannotStamp(Exception):
    """The template does not stamp out safely (the reason); the exporter traces the whole model instead."""


@dataclasses.dataclass(frozen=True)
class StampPlan:
    """Which layers the template holds.

    Attributes:
        layers_path: the decoder layers' `ModuleList` (`Family.layers`, e.g. "model.layers").
        kind_of: the kind (template position) of every decoder layer.
        templates: per kind, the first decoder layer of that kind (the one the template traces).
    """

    layers_path: str
    kind_of: tuple[int, ...]
    templates: tuple[int, ...]


def plan_for(model: torch.nn.Module) -> Optional[StampPlan]:
    """The stamp plan of `model`, or None where tracing a template saves nothing (every layer its own kind) or the
    model is not of a known family."""
    from qcompiler import QCompilerError
    from qcompiler.models.families import family_for, get_module

    try:
        family = family_for(model)
        layers = get_module(model, family.layers)
    except QCompilerError:
        return None
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = getattr(text, "layer_types", None)
    keys: dict[Any, int] = {}
    kind_of, templates = [], []
    for i, layer in enumerate(layers):
        shapes = tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters())
        key = (types[i] if types else None, family.attention(text, i), type(layer), shapes)
        if key not in keys:
            keys[key] = len(templates)
            templates.append(i)
        kind_of.append(keys[key])
    if len(templates) >= len(kind_of):
        return None
    return StampPlan(layers_path=family.layers, kind_of=tuple(kind_of), templates=tuple(templates))


def _marker(op: str, x: torch.Tensor, position: int) -> torch.Tensor:
    return torch.onnx.ops.symbolic(f"{DOMAIN}::{op}", (x,), {"layer": position}, dtype=x.dtype, shape=x.shape,
                                   version=1)


@dataclasses.dataclass
class Template:
    """What `template` traced: K layers, and per template layer the values its parameters had in the trace."""

    layers: int
    values: list[dict[str, np.ndarray]]


@contextlib.contextmanager
def template(model: torch.nn.Module, plan: StampPlan) -> Iterator[Template]:
    """`model` holding only the template layers (`plan.templates`, renumbered 0..K-1 in the config, `layer_idx`
    attributes and the cache) with their inputs and outputs marked; everything is restored on exit.

    The template layers trace with stand-in parameters: distinct random values (the exporter merges initializers of
    equal value, e.g. two norms' all-ones weights, which would leave no initializer to put each layer's own weight
    in). Every layer's weights are replaced by `stamp` anyway; the originals are not touched."""
    from qcompiler.models.families import get_module

    parent_path, _, attr = plan.layers_path.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    full = getattr(parent, attr)
    chosen = [full[j] for j in plan.templates]
    configs = {id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: None)())
               if c is not None}.values()
    saved_config = [(c, {k: getattr(c, k) for k in ("num_hidden_layers", "layer_types") if hasattr(c, k)})
                    for c in configs]
    saved_idx = [(m, m.layer_idx) for layer in chosen for m in layer.modules() if hasattr(m, "layer_idx")]
    saved_params = [(m, name, p) for layer in chosen for m in layer.modules()
                    for name, p in m._parameters.items() if p is not None]
    handles = []
    traced: list[dict[str, np.ndarray]] = []
    g = torch.Generator().manual_seed(0)
    try:
        for layer in chosen:
            traced.append({})
            stand_in: dict[int, torch.nn.Parameter] = {}
            for name, p in list(layer.named_parameters()):
                q = torch.randn(p.shape, generator=g).mul_(0.02).to(dtype=p.dtype, device=p.device)
                stand_in[id(p)] = torch.nn.Parameter(q, requires_grad=False)
                traced[-1][name] = q.numpy()
            for m in layer.modules():
                for name, p in list(m._parameters.items()):
                    if p is not None:
                        m._parameters[name] = stand_in[id(p)]
        setattr(parent, attr, torch.nn.ModuleList(chosen))
        for c, values in saved_config:
            c.num_hidden_layers = len(chosen)
            if values.get("layer_types") is not None:
                c.layer_types = [values["layer_types"][j] for j in plan.templates]
        for p, layer in enumerate(chosen):
            for m in layer.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = p
            handles.append(layer.register_forward_pre_hook(_mark_input(p), with_kwargs=True))
            handles.append(layer.register_forward_hook(_mark_output(p)))
        yield Template(layers=len(chosen), values=traced)
    finally:
        for h in handles:
            h.remove()
        for m, name, p in saved_params:
            m._parameters[name] = p
        for m, idx in saved_idx:
            m.layer_idx = idx
        for c, values in saved_config:
            for k, v in values.items():
                setattr(c, k, v)
        setattr(parent, attr, full)


def _mark_input(position: int):
    def hook(_module, args, kwargs):
        if args:
            return (_marker(MARK_IN, args[0], position), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _marker(MARK_IN, kwargs["hidden_states"], position)}

    return hook


def _mark_output(position: int):
    def hook(_module, _args, output):
        if isinstance(output, torch.Tensor):
            return _marker(MARK_OUT, output, position)
        return (_marker(MARK_OUT, output[0], position), *output[1:])

    return hook


# ---------------------------------------------------------------------------------------------------- stamping
@dataclasses.dataclass
class _Weight:
    """How a template initializer is made from a parameter of its layer: `param` (layer-relative name), then
    transposed, reshaped to `shape` and/or plus `offset`."""

    param: str
    transpose: bool = False
    offset: Optional[float] = None
    shape: Optional[tuple[int, ...]] = None

    def make(self, value: np.ndarray) -> np.ndarray:
        out = value.T if self.transpose else value
        if self.shape is not None:
            out = out.reshape(self.shape)
        if self.offset is not None:
            out = out + np.asarray(self.offset, dtype=out.dtype)
        return np.ascontiguousarray(out)


def _match(init: np.ndarray, params: dict[str, np.ndarray], *, scalars: bool = False) -> Optional[_Weight]:
    """The parameter (and transform) `init` was made from, checked bit for bit; None if none. One-element
    parameters only with `scalars` (a one-element constant matches too many of them by chance)."""
    for name, value in params.items():
        if value.size != init.size or (value.size <= 1 and not scalars):
            continue
        for transpose in ((False, True) if value.ndim == 2 else (False,)):
            cand = value.T if transpose else value
            if init.dtype != cand.dtype:
                continue
            shape = None if cand.shape == init.shape else tuple(init.shape)
            cand = cand.reshape(init.shape)
            if np.array_equal(cand, init):
                return _Weight(name, transpose, shape=shape)
            diff = float(init.flat[0]) - float(cand.flat[0])
            for offset in (round(diff, 6), diff):  # a constant such as Gemma's 1.0, read back through rounding
                weight = _Weight(name, transpose, offset, shape)
                if np.array_equal(weight.make(value), init):
                    return weight
    return None


def _copy(message):
    out = type(message)()
    out.CopyFrom(message)
    return out


def stamp(proto: onnx.ModelProto, plan: StampPlan, model: torch.nn.Module, traced: Template, *,
          folder: Optional[str]) -> None:
    """Turn the traced template `proto` (in place) into the full model's graph (see the module docstring).
    `folder`: where the template's weights are borrowed from (`qcompiler.graph.external.borrow`); the stamped layers'
    weights are spilled there too, except those an offloaded model's store already holds as the graph stores them
    (`qcompiler.models.offload.export_layout`), which are borrowed from the store. None: weights inline."""
    from qcompiler.models.families import get_module
    from qcompiler.models.offload import file_range

    g = proto.graph
    K = traced.layers
    layers = get_module(model, plan.layers_path)
    nodes = list(g.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            consumers.setdefault(x, []).append(i)
    marks_in, marks_out = {}, {}
    for i, n in enumerate(nodes):
        if n.domain == DOMAIN:
            layer = next(a.i for a in n.attribute if a.name == "layer")
            (marks_in if n.op_type == MARK_IN else marks_out)[layer] = i
    if sorted(marks_in) != list(range(K)) or sorted(marks_out) != list(range(K)):
        raise CannotStamp(f"layer markers {sorted(marks_in)} / {sorted(marks_out)} for {K} template layers")
    inits = {t.name: t for t in g.initializer}

    # each template layer's weights: initializer name → how to make it from a parameter of that layer
    owned: list[dict[str, _Weight]] = []
    for p in range(K):
        params = traced.values[p]
        fqn = f"model.{plan.layers_path}.{p}."  # the exporter's names: the wrapper's attribute, then the module path
        found: dict[str, _Weight] = {}
        for name, t in inits.items():
            if name.startswith(fqn) and name[len(fqn):] in params:  # as is, or as the exporter transformed it
                weight = _match(tensor_array(t), {name[len(fqn):]: params[name[len(fqn):]]}, scalars=True)
                if weight is None:
                    raise CannotStamp(f"initializer {name} does not follow from its parameter")
                found[name] = weight
        owned.append(found)

    graph_outputs = {o.name for o in g.output}
    members: list[set[int]] = []
    for p in range(K):
        sources = {nodes[marks_in[p]].output[0], f"past_key_values.{p}.key", f"past_key_values.{p}.value"}
        # descendants of the layer's own inputs (a Shape of its past is a shared dimension, not the layer's)
        down, stack = set(), [c for s in sources for c in consumers.get(s, []) if nodes[c].op_type != "Shape"
                              or s == nodes[marks_in[p]].output[0]]
        while stack:
            c = stack.pop()
            if c in down or c in (marks_in.get(p + 1), marks_out[p]) or nodes[c].domain == DOMAIN:
                continue
            down.add(c)
            stack += [d for o in nodes[c].output for d in consumers.get(o, [])]
        # ancestors of its output and presents
        ends = [nodes[marks_out[p]].input[0], f"present.{p}.key", f"present.{p}.value"]
        up, stack = set(), [producer[e] for e in ends if e in producer]
        while stack:
            c = stack.pop()
            if c in up or nodes[c].domain == DOMAIN:
                continue
            up.add(c)
            stack += [producer[x] for x in nodes[c].input if x in producer]
        member = down & up
        # nodes that read only the layer's weights (and shared values) belong to it too
        weights = set(owned[p])
        extra = {c for c in up - member for x in nodes[c].input if x in weights}
        members.append(member | extra)
    taken = [c for m in members for c in m]
    if len(taken) != len(set(taken)):
        raise CannotStamp("a node belongs to two template layers")
    in_layer = set(taken)

    # every initializer a layer reads: one of its weights (matched by value where the exporter made a new one) or a
    # small shared constant
    for p in range(K):
        params = traced.values[p]
        shared: set[str] = set()
        for c in members[p]:
            for x in nodes[c].input:
                if x not in inits or x in owned[p] or x in shared:
                    continue
                users = consumers.get(x, [])
                value = tensor_array(inits[x])
                if all(u in members[p] for u in users) and value.size > 1:
                    weight = _match(value, params)
                    if weight is not None:
                        owned[p][x] = weight
                        continue
                shared.add(x)
                if value.size > SMALL_CONSTANT:
                    raise CannotStamp(f"initializer {x} ({value.size} elements) inside layer {p} is not a weight")
        missing = set(params) - {w.param for w in owned[p].values()}
        if missing:  # (every mapping found reproduces the template's values bit for bit: `_match`)
            raise CannotStamp(f"the template's layer {p} has parameters no initializer carries: {sorted(missing)}")

    # prefix: outside the layers and not after one; suffix: the rest outside the layers
    after: set[int] = set()
    stack = [c for p in range(K) for c in consumers.get(nodes[marks_out[p]].output[0], [])]
    while stack:
        c = stack.pop()
        if c in after:
            continue
        after.add(c)
        stack += [d for o in nodes[c].output for d in consumers.get(o, [])]
    markers = set(marks_in.values()) | set(marks_out.values())
    between = {c for c in after - in_layer - markers for p in range(K - 1)
               if any(x in producer and producer[x] in members[p + 1] for x in nodes[c].output)}
    if between:
        raise CannotStamp("nodes between two decoder layers")
    prefix = [c for c in range(len(nodes)) if c not in in_layer and c not in markers and c not in after]
    suffix = [c for c in range(len(nodes)) if c not in in_layer and c not in markers and c in after]

    hidden = nodes[marks_in[0]].input[0]
    made = [{o for c in members[p] for o in nodes[c].output if o} for p in range(K)]
    inside = set().union(*made) | {nodes[c].output[0] for c in markers}
    last = nodes[marks_out[K - 1]].output[0]
    for c in prefix + suffix:
        if any(x in inside and x != last for x in nodes[c].input):
            raise CannotStamp(f"node {nodes[c].name} outside the layers reads a value made inside one")
    value_info = {v.name: v for v in g.value_info}
    new_nodes = [_copy(nodes[c]) for c in prefix]
    new_inits = [_copy(t) for name, t in inits.items() if not any(name in o for o in owned)]
    new_info = [_copy(v) for name, v in value_info.items() if not any(name in m for m in made)]
    out_of = {p: nodes[marks_out[p]].input[0] for p in range(K)}
    module = re.escape(plan.layers_path)
    for i, p in enumerate(plan.kind_of):
        layer = layers[i]
        params = {n: v for n, v in layer.named_parameters()}
        rename = {x: f"layers.{i}.{x}" for x in made[p]}
        rename[nodes[marks_in[p]].output[0]] = hidden
        for kv in ("key", "value"):
            rename[f"past_key_values.{p}.{kv}"] = f"past_key_values.{i}.{kv}"
            rename[f"present.{p}.{kv}"] = f"present.{i}.{kv}"
        fqn_t, fqn_i = f"model.{plan.layers_path}.{p}.", f"model.{plan.layers_path}.{i}."
        for name, weight in owned[p].items():
            new = fqn_i + name[len(fqn_t):] if name.startswith(fqn_t) else f"layers.{i}.{name}"
            rename[name] = new
            array = weight.make(params[weight.param].detach().cpu().numpy())
            where = file_range(model, array) if folder is not None and goes_external(array.nbytes) else None
            if where is not None:  # already in the offloaded model's store file, laid out as the exporter stores it
                t = file_tensor(new, array, *where)
            else:
                t = onnx.numpy_helper.from_array(array, new)
                if folder is not None:
                    spill(t, folder)
            new_inits.append(t)
        pattern = re.compile(rf"({module}\.){p}(?=[.:/\s]|$)")
        for c in sorted(members[p]):
            n = _copy(nodes[c])
            n.name = f"layers.{i}.{n.name}"
            for k, x in enumerate(n.input):
                n.input[k] = rename.get(x, x)
            for k, x in enumerate(n.output):
                n.output[k] = rename.get(x, x)
            for prop in n.metadata_props:
                if prop.key == "namespace":
                    prop.value = pattern.sub(rf"\g<1>{i}", prop.value)
            new_nodes.append(n)
        for x in made[p]:
            if x in value_info and x not in graph_outputs:
                v = _copy(value_info[x])
                v.name = rename[x]
                new_info.append(v)
        hidden = rename.get(out_of[p], out_of[p])
    for c in suffix:
        n = _copy(nodes[c])
        for k, x in enumerate(n.input):
            if x == last:
                n.input[k] = hidden
        new_nodes.append(n)

    def per_layer(values, prefix_name: str):
        by_name = {v.name: v for v in values}
        out = [_copy(v) for v in values if not v.name.startswith(prefix_name)]
        for i, p in enumerate(plan.kind_of):
            for kv in ("key", "value"):
                v = _copy(by_name[f"{prefix_name}{p}.{kv}"])
                v.name = f"{prefix_name}{i}.{kv}"
                out.append(v)
        return out

    inputs, outputs = per_layer(list(g.input), "past_key_values."), per_layer(list(g.output), "present.")
    for field, values in (("node", new_nodes), ("initializer", new_inits), ("value_info", new_info),
                          ("input", inputs), ("output", outputs)):
        g.ClearField(field)
        getattr(g, field).extend(values)
    kept = [o for o in proto.opset_import if o.domain != DOMAIN]
    proto.ClearField("opset_import")
    proto.opset_import.extend(kept)
