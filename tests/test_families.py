"""Model families as data: lookup by config, module paths of the quantizable linears, unsupported architectures."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import tiny_config, tiny_model

from qcompiler import QCompilerError
from qcompiler.families import FAMILIES, family_for, get_module, iter_layers, quantizable_linears


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "opt"])
def test_family_lookup_and_linears(kind):
    model = tiny_model(kind)
    family = family_for(model.config)
    assert family.name == kind
    assert family_for(model) is family  # a model works as well as its config
    linears = quantizable_linears(model, family)
    n_layers = model.config.num_hidden_layers
    assert len(linears) == n_layers * len(family.linear_names) == n_layers * (6 if kind == "opt" else 7)
    named = dict(model.named_modules())
    for path, module in linears.items():
        assert named[path] is module and isinstance(module, torch.nn.Linear)
    assert "lm_head" not in linears and not any("embed" in p for p in linears)
    first = next(iter(linears))
    assert first == f"{family.layers}.0.self_attn.q_proj"
    assert [p for p, _ in iter_layers(model, family)] == [f"{family.layers}.{i}" for i in range(n_layers)]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt"])
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
    assert ("layernorm" in norm_type) == (family.norm == "layernorm")


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
    assert "'gpt2'" in msg and "llama, mistral, opt, qwen2" in msg and "\n" not in msg
