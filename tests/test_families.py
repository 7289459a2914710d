"""Model families as data: lookup by config, module paths of the quantizable linears, unsupported architectures."""

from __future__ import annotations

import ast
import dataclasses

import pytest
import torch
from tests.helpers import REPO, tiny_config, tiny_model

from qcompiler import QCompilerError
from qcompiler.models.families import (FAMILIES, GLOBAL_ROPE, LLAMA, MISTRAL, OPT, QWEN2, QWEN3, Attention,
                                       FusedLinear, Norm, family_for, get_module, iter_layers, layer_attention,
                                       norm_paths, quantizable_linears)

KINDS = ["llama", "llama3", "mistral", "mistral-swa", "qwen2", "qwen2-swa", "qwen3", "phi3", "gemma2", "gemma3_text",
         "smollm3", "granite", "opt"]  # tests/helpers.py::tiny_config
FAMILY_OF = {"llama3": "llama", "mistral-swa": "mistral", "qwen2-swa": "qwen2"}  # tiny configs named apart


@pytest.mark.parametrize("kind", KINDS)
def test_family_lookup_and_linears(kind):
    model = tiny_model(kind)
    family = family_for(model.config)
    assert family.name == FAMILY_OF.get(kind, kind)
    assert family_for(model) is family  # a model works as well as its config
    linears = quantizable_linears(model, family)
    n_layers = model.config.num_hidden_layers
    assert len(linears) == n_layers * len(family.linear_names) == n_layers * {"opt": 6, "phi3": 4}.get(kind, 7)
    named = dict(model.named_modules())
    for path, module in linears.items():
        assert named[path] is module and isinstance(module, torch.nn.Linear)
    assert "lm_head" not in linears and not any("embed" in p for p in linears)
    first = next(iter(linears))
    assert first == f"{family.layers}.0.self_attn.{'qkv_proj' if kind == 'phi3' else 'q_proj'}"
    assert [p for p, _ in iter_layers(model, family)] == [f"{family.layers}.{i}" for i in range(n_layers)]


@pytest.mark.parametrize("kind", KINDS)
def test_family_paths_resolve(kind):
    model = tiny_model(kind)
    family = family_for(model.config)
    for path in (family.final_norm, family.lm_head, *family.embeddings):
        get_module(model, path)
    _, layer = next(iter_layers(model, family))
    for norm, targets in family.norm_linears:
        get_module(layer, norm)
        for t in targets:
            assert isinstance(get_module(layer, t), torch.nn.Linear)
    v, o = family.v_o
    assert isinstance(get_module(layer, v), torch.nn.Linear) and isinstance(get_module(layer, o), torch.nn.Linear)
    norm_type = type(get_module(layer, family.norm_linears[0][0])).__name__.lower()
    assert family.norm.kind in norm_type
    assert (getattr(get_module(layer, family.norm_linears[0][0]), "bias", None) is not None) == family.norm.has_bias


@pytest.mark.parametrize("kind", KINDS)
def test_record_names_every_norm_of_a_layer(kind):
    # a record that forgets a norm (Gemma's four per layer, Qwen3's q/k norms) fails here
    model = tiny_model(kind)
    family = family_for(model.config)
    _, layer = next(iter_layers(model, family))
    norms = {n for n, m in layer.named_modules() if "norm" in type(m).__name__.lower()}
    assert norms == set(norm_paths(family)) and len(norm_paths(family)) == len(norms)


def test_hook_defaults_change_nothing():
    for family in (LLAMA, MISTRAL, QWEN2, OPT):
        assert family.qk_norms is None and family.output_norms == () and family.fused == ()
        assert family.norm.weight_offset == 0.0
        assert layer_attention(family, tiny_config("llama")) == [GLOBAL_ROPE, GLOBAL_ROPE]


@pytest.mark.parametrize("kind, expected", [
    ("mistral-swa", [Attention(sliding_window=8), Attention(sliding_window=8)]),  # sliding_window on every layer
    ("qwen2-swa", [GLOBAL_ROPE, Attention(sliding_window=8)]),  # local from max_window_layers on
    ("gemma2", [Attention(sliding_window=8), GLOBAL_ROPE]),  # layer_types
    ("gemma3_text", [Attention(sliding_window=8), GLOBAL_ROPE]),
    ("smollm3", [GLOBAL_ROPE, Attention(rope=False)]),  # no_rope_layers: every 2nd layer NoPE here
])
def test_layer_attention_reads_the_config_as_transformers_does(kind, expected):
    """What each layer attends to, as the modeling code reads the config; the exporter traces that code, and
    quant_config.json reports these (tests/test_architectures.py runs sequences longer than the windows)."""
    cfg = tiny_config(kind)
    assert layer_attention(family_for(cfg), cfg) == expected


def test_a_window_that_covers_the_context_is_global_attention():
    cfg = tiny_config("mistral")
    cfg.sliding_window = cfg.max_position_embeddings  # Mistral's default 4096 ≥ the tiny config's 256 too
    assert layer_attention(family_for(cfg), cfg) == [GLOBAL_ROPE, GLOBAL_ROPE]


def test_a_fused_value_projection_gets_no_head_transform():
    """Phi-3's q/k/v share one linear: no value → output transform (its v rows alone would carry it), the norm →
    linears transforms stay; a split value projection keeps its pair."""
    from qcompiler.models.families import PHI3
    from qcompiler.quantize.transforms import head_pair

    assert head_pair(LLAMA) == LLAMA.v_o
    assert head_pair(PHI3) is None
    assert head_pair(dataclasses.replace(LLAMA, fused=(FusedLinear("self_attn.v_proj", ("q", "k", "v")),))) is None


# ---------------------------------------------------------------------------------------------------- no branching
_NAME_ATTRS = ("model_type",)  # compared to a string anywhere: a family branch
_FAMILY_ATTRS = ("name", "norm", "genai_type")  # of something called *family*


def _chain(node) -> list[str]:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        names.append(node.id)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
        names += [node.args[1].value, *_chain(node.args[0])]
    return names


def _is_family_key(node) -> bool:
    chain = _chain(node)
    if not chain:
        return False
    if chain[0] in _NAME_ATTRS:
        return True
    if chain[0] == "kind" and "norm" in chain[1:]:  # family.norm.kind: the norm's behaviour is its fields
        return True
    return chain[0] in _FAMILY_ATTRS and any("family" in str(n).lower() for n in chain[1:])


def _is_text(node) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_text(e) for e in node.elts)
    return False


def family_branches(source: str, filename: str = "<string>") -> list[str]:
    """`file:line` of every comparison of a family name / `model_type` / norm kind with string literal(s)."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_family_key(o) for o in operands) and any(_is_text(o) for o in operands):
                out.append(f"{filename}:{node.lineno}")
        elif isinstance(node, ast.Match) and _is_family_key(node.subject):
            out.append(f"{filename}:{node.lineno}")
    return out


def test_no_module_branches_on_a_family_name():
    offenders = [hit for root in ("qcompiler", "passes") for path in sorted((REPO / root).rglob("*.py"))
                 for hit in family_branches(path.read_text(), str(path.relative_to(REPO)))]
    assert not offenders, offenders


@pytest.mark.parametrize("snippet", [
    "if family.name == 'opt': pass",
    "x = 1 if self.family.name in ('llama', 'mistral') else 2",
    "if config.model_type != 'gemma': pass",
    "if getattr(config, 'model_type', None) == 'phi3': pass",
    "has_shift = family.norm == 'layernorm'",
    "has_shift = self.family.norm.kind == 'layernorm'",
    "match family.name:\n    case 'opt': pass",
])
def test_family_branch_check_can_fail(snippet):
    assert family_branches(snippet)


def test_family_branch_check_passes_data():
    assert not family_branches("has_shift = family.norm.has_bias\nname = family.name\nif kind == 'opt': pass")


def test_linear_bias_flags():
    assert family_for(tiny_config("opt")).has_linear_bias
    assert not family_for(tiny_config("llama")).has_linear_bias
    qwen = tiny_model("qwen2")
    lin = quantizable_linears(qwen, family_for(qwen.config))
    assert lin["model.layers.0.self_attn.q_proj"].bias is not None
    assert lin["model.layers.0.self_attn.o_proj"].bias is None


def test_model_types_unique():
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types))


def test_unknown_architecture():
    from transformers import GPT2Config

    with pytest.raises(QCompilerError) as e:
        family_for(GPT2Config(n_layer=1))
    msg = str(e.value)
    assert "'gpt2'" in msg and "gemma2, gemma3_text, granite, llama, mistral, opt, phi3, qwen2, qwen3, smollm3" in msg and "\n" not in msg
