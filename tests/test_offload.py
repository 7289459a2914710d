"""--offload-weights (qcompiler/models/offload.py): the fp32 weights in a file-backed mapping, streamed from safetensors
or GGUF."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers import GGUF_KINDS, tiny_config
from qcompiler import QCompilerError
from qcompiler.models import preflight
from qcompiler.cli import main
from qcompiler.models.loading import load_model
from qcompiler.models.offload import WeightStore, load_offloaded


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_offloaded_weights_equal_the_checkpoint_and_live_in_the_store(kind, tiny_dirs):
    model, _ = load_offloaded(str(tiny_dirs(kind)), progress=False)
    ref, _ = load_model(str(tiny_dirs(kind)), progress=False)
    params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    assert params.keys() == ref_params.keys()
    store = model.qcompiler_store
    for name, p in params.items():
        assert torch.equal(p, ref_params[name]), name
        assert p.untyped_storage().data_ptr() == store.flat.untyped_storage().data_ptr(), name  # a view of the store
    assert store.flat.untyped_storage().filename == store.path
    # tied embeddings (OPT's default) stay one tensor; untied ones (the tiny LLaMA) stay two
    tied = ref.get_output_embeddings().weight is ref.get_input_embeddings().weight
    assert tied == (kind == "opt")
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind,method,flags", [
    ("llama", "rtn", ["--bits", "3", "--group-size", "16"]),
    ("opt", "gptq", ["--bits", "3", "--group-size", "16", "--nsamples", "4", "--seqlen", "32"]),
    ("opt", "affinequant", ["--bits", "3", "--group-size", "16", "--epochs", "2", "--nsamples", "4", "--seqlen", "32"]),
])
def test_offloaded_export_is_byte_identical(kind, method, flags, tiny_dirs, text_file, tmp_path, monkeypatch):
    import qcompiler.models.offload

    calls = []
    real = qcompiler.models.offload.load_offloaded
    monkeypatch.setattr(qcompiler.models.offload, "load_offloaded", lambda *a, **k: calls.append(a) or real(*a, **k))
    calib = ["--calibration", str(text_file)] if method != "rtn" else []
    if method == "affinequant":  # its full-precision copies go to unlinked spill stores next to the weights
        spills = []
        real_spill = qcompiler.models.offload.spill_store
        monkeypatch.setattr(qcompiler.models.offload, "spill_store",
                            lambda *a: (lambda s: spills.append(s) or s)(real_spill(*a)))
    outs = []
    for name, extra in (("plain", []), ("offload", ["--offload-weights"])):
        out = tmp_path / name
        assert main(["export", str(tiny_dirs(kind)), "--method", method, *flags, *calib, *extra, "-o", str(out),
                     "-q"]) == 0
        outs.append(out)
    assert len(calls) == 1  # the second export loaded through the weight store
    if method == "affinequant":
        # plain: no store (None); offloaded: one for fp_state + expected, one for the full-precision copy
        assert spills[0] is None and len(spills) == 3 and all(s.used > 0 for s in spills[1:])
    for f in ("model.onnx", "model.onnx.data"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


@pytest.mark.parametrize("tied", [False, True])
def test_offloaded_gguf_equals_transformers_gguf_loader(tied, tiny_gguf):
    """GGUF tensors dequantized one at a time (Q8_0 and F32), LLaMA's q/k rows put back in order, named as
    transformers' loader names them: the same weights, bit for bit, as a view of the store."""
    from tests.helpers import tiny_model

    path = tiny_gguf(tied=tied)
    model, tok = load_offloaded(str(path), progress=False)
    ref, ref_tok = load_model(str(path), progress=False)
    params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    assert params.keys() == ref_params.keys()
    for name, p in params.items():
        assert torch.equal(p, ref_params[name]), name
        assert p.untyped_storage().data_ptr() == model.qcompiler_store.flat.untyped_storage().data_ptr(), name
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    written = dict(tiny_model("llama").named_parameters())  # what the GGUF file was written from
    assert torch.equal(params["model.layers.1.self_attn.q_proj.weight"],
                       written["model.layers.1.self_attn.q_proj.weight"])  # the permutation undone exactly
    assert torch.equal(params["model.layers.0.self_attn.k_proj.weight"],
                       written["model.layers.0.self_attn.k_proj.weight"])
    down = params["model.layers.0.mlp.down_proj.weight"]
    err = (down - written["model.layers.0.mlp.down_proj.weight"]).abs().max().item()
    assert 0 < err < 1e-3  # Q8_0: dequantized, not a copy of the fp32 source
    assert tok("w1 w12 w3")["input_ids"] == ref_tok("w1 w12 w3")["input_ids"]


# the model_type transformers' GGUF loader gives each file (llama.cpp writes Mistral as "llama"; transformers only
# reads it as mistral when general.name is exactly "mistral", so a Mistral GGUF loads, weights and all, as LLaMA)
GGUF_MODEL_TYPE = {"mistral": "llama", "gemma3_text": "gemma3_text"}


@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_gguf_of_each_family_loads_as_transformers_loads_it(kind, tiny_gguf):
    """A GGUF file of each GGUF-capable type, written as llama.cpp's converter writes it (its names, LLaMA's q/k
    permutation, Gemma's `1 + w` norms, Phi-3's fused qkv / gate_up, Qwen's q/k/v biases and Qwen3's q/k norms):
    the offloaded weights equal transformers' loader bit for bit and the model written (ffn_down within its Q8_0
    rounding)."""
    from tests.helpers import gguf_model

    path = tiny_gguf(kind=kind)
    model, _ = load_offloaded(str(path), progress=False)
    ref, _ = load_model(str(path), progress=False)
    assert model.config.model_type == ref.config.model_type == GGUF_MODEL_TYPE.get(kind, kind)
    params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    written = dict(gguf_model(kind).named_parameters())
    assert params.keys() == ref_params.keys() == written.keys()
    for name, p in params.items():
        assert torch.equal(p, ref_params[name]), name
        if name.endswith("mlp.down_proj.weight"):
            assert 0 < (p - written[name]).abs().max().item() < 1e-3, name
        elif kind.startswith("gemma") and name.endswith("norm.weight"):  # stored as 1 + w, read back as that − 1
            assert torch.equal(p, (written[name] + 1) - 1), name
        else:
            assert torch.equal(p, written[name]), name


@pytest.mark.parametrize("kind, what", [("phi3", "longrope and partial rotary"), ("gemma2", "soft-capping")])
def test_gguf_config_keeps_what_transformers_gguf_loader_drops(kind, what, tiny_gguf):
    """llama.cpp stores Phi-3's longrope factors and rotary dimension and Gemma 2's soft-capping values; transformers'
    GGUF loader reads none of them (class defaults: plain rope over the whole head, caps 30 / 50). Loaded here, the
    model computes what the model written computes (its weights put into the written model give the same logits);
    transformers' own loader gives a different model."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import gguf_model

    path = tiny_gguf(kind=kind)
    ids = torch.tensor([list(range(3, 43))])  # past Phi-3's original context of 32: the long factors too
    for loader in (load_model, load_offloaded):
        model, _ = loader(str(path), progress=False)
        written = gguf_model(kind)
        written.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, written(ids).logits, atol=1e-5), (loader.__name__, what)
    plain = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, written(ids).logits, atol=1e-3), what


@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_offloaded_gguf_export_is_byte_identical(kind, tiny_gguf, tmp_path):
    outs = []
    for name, extra in (("plain", []), ("offload", ["--offload-weights"])):
        out = tmp_path / name
        assert main(["export", str(tiny_gguf(kind=kind)), "--method", "rtn", "--bits", "3", "--group-size", "16",
                     *extra, "-o", str(out), "-q"]) == 0
        outs.append(out)
    for f in ("model.onnx", "model.onnx.data"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def test_copy_of_an_offloaded_model_is_file_backed_and_shares_the_store(tiny_dirs):
    from qcompiler.models.offload import copy_model, keep, spill_store

    model, _ = load_offloaded(str(tiny_dirs("llama")), progress=False)
    copy = copy_model(model)
    assert copy.qcompiler_store is model.qcompiler_store  # shared, not copied into memory
    main_ptr = model.qcompiler_store.flat.untyped_storage().data_ptr()
    copied = dict(copy.named_parameters())
    for name, p in model.named_parameters():
        c = copied[name]
        assert torch.equal(c, p) and c.untyped_storage().data_ptr() != main_ptr, name
        assert c.untyped_storage().filename is not None, name  # file pages (an unlinked spill file)
    with torch.no_grad():
        copied["model.norm.weight"].add_(1.0)  # independent of the original
    assert not torch.equal(copied["model.norm.weight"], dict(model.named_parameters())["model.norm.weight"])
    assert spill_store(load_model(str(tiny_dirs("llama")), progress=False)[0], 10) is None  # not offloaded
    t = torch.arange(5.0)
    assert keep(None, t) is not t and torch.equal(keep(None, t), t)



def _root(a):
    """The object at the bottom of a NumPy array's `base` chain (an mmap for file-backed arrays)."""
    while True:
        if isinstance(a, memoryview):
            a = a.obj
        elif getattr(a, "base", None) is not None:
            a = a.base
        else:
            return a


def test_quantized_layers_of_an_offloaded_model_are_file_pages(tiny_dirs):
    """RTN on an offloaded model: each SpQRWeight's arrays are copy-on-write mappings of an unlinked file (not
    anonymous memory), equal to the in-memory run's; writing one leaves the other layers alone; without offload the
    layers stay ordinary arrays."""
    import mmap

    import numpy as np

    from qcompiler.models.families import family_for
    from qcompiler.quantize.methods import get_method

    rtn = get_method("rtn")
    model, _ = load_offloaded(str(tiny_dirs("llama")), progress=False)
    family = family_for(model.config)
    spilled = rtn(rtn.Config(bits=4, group_size=16)).quantize(model, family, progress=False).layers
    plain_model, _ = load_model(str(tiny_dirs("llama")), progress=False)
    plain = rtn(rtn.Config(bits=4, group_size=16)).quantize(plain_model, family, progress=False).layers
    assert spilled.keys() == plain.keys() and spilled
    for path, w in spilled.items():
        ref = plain[path]
        for name in ("qweight", "scales", "zeros"):
            a = getattr(w, name)
            assert isinstance(_root(a), mmap.mmap) and not isinstance(_root(getattr(ref, name)), mmap.mmap)
            assert np.array_equal(a, getattr(ref, name)) and a.dtype == getattr(ref, name).dtype
    maps = open("/proc/self/maps").read()
    assert "qcompiler-layer-" in maps and "(deleted)" in maps  # unlinked files, mapped
    first, second = list(spilled.values())[:2]
    before = second.qweight.copy()
    first.qweight[...] = 0
    assert not first.qweight.any() and np.array_equal(second.qweight, before)


def test_export_of_an_offloaded_model_borrows_its_linear_weights_from_the_store(tiny_dirs):
    """`export_layout` lays each (untied) linear weight out transposed in the store, values unchanged; the per-layer
    export then points every decoder linear's initializer at the store file instead of copying it, and the bytes
    it points at are the initializer the exporter would have written."""
    import os

    import numpy as np

    from qcompiler.graph.export import export_model
    from qcompiler.graph.external import is_borrowed, tensor_array
    from qcompiler.models.offload import export_layout, file_range

    model, _ = load_offloaded(str(tiny_dirs("llama")), progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert export_layout(model) == len(linears) - tied
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    q = model.model.layers[0].self_attn.q_proj.weight
    assert not q.is_contiguous() and q.t().is_contiguous()
    assert file_range(model, q.detach().numpy().T) is not None
    exported = export_model(model, borrow_weights=True)
    store = os.path.basename(model.qcompiler_store.path)
    linears = exported.manifest["linears"]
    inits = {t.name: t for t in exported.model.graph.initializer}
    for module, entry in linears.items():
        if not module.startswith("model.layers."):
            continue
        t = inits[entry["weight"]]
        location = {e.key: e.value for e in t.external_data}["location"]
        assert is_borrowed(t) and location == store, module
        W = dict(model.named_parameters())[module + ".weight"].detach().numpy()
        assert np.array_equal(tensor_array(t), W.T if entry["weight_layout"] == "KxN" else W), module
    assert export_layout(load_model(str(tiny_dirs("llama")), progress=False)[0]) == 0  # not offloaded

def test_offload_needs_a_local_safetensors_folder_or_gguf(tiny_dirs, tmp_path):
    with pytest.raises(QCompilerError, match=r"^model path not found: .*nowhere\.gguf$"):
        load_offloaded(str(tmp_path / "nowhere.gguf"), progress=False)
    with pytest.raises(QCompilerError, match=r"^--offload-weights needs a local HF folder with safetensors weights "
                                             r"or a local GGUF file \(got some-org/some-model: hub ids"):
        load_offloaded("some-org/some-model", progress=False)
    folder = tmp_path / "bin"
    shutil.copytree(tiny_dirs("llama"), folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(QCompilerError, match="needs safetensors weights"):
        load_offloaded(str(folder), progress=False)


def test_offload_reports_a_missing_weight(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "untied"
    shutil.copytree(tiny_dirs("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    tensors.pop("lm_head.weight", None)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QCompilerError, match=r"the checkpoint lacks 1 weight\(s\) the model needs \(lm_head.weight\)"):
        load_offloaded(str(folder), progress=False)


def test_weight_store_views_are_aligned_and_bounded(tmp_path):
    store = WeightStore(40, folder=str(tmp_path))
    a = store.take(torch.Size([3, 5]))
    b = store.take(torch.Size([4]))
    assert a.shape == (3, 5) and b.shape == (4,)
    assert (b.data_ptr() - a.data_ptr()) % 64 == 0 and b.data_ptr() > a.data_ptr()
    a.fill_(1.0)
    assert float(b.sum()) == 0.0
    with pytest.raises(RuntimeError, match="weight store full"):
        store.take(torch.Size([20]))


def test_offload_memory_estimate_is_smaller():
    from qcompiler.quantize.methods import get_method

    config = tiny_config("llama")
    plain = preflight.estimate_memory(config, get_method("gptq"), calibrated=True, nsamples=8, seqlen=128)
    off = preflight.estimate_memory(config, get_method("gptq"), calibrated=True, nsamples=8, seqlen=128, offload=True)
    assert off.total < plain.total and off.activation_bytes == plain.activation_bytes
    aq = preflight.estimate_memory(config, get_method("affinequant"), calibrated=True, nsamples=8, seqlen=128, offload=True)
    assert aq.total < preflight.estimate_memory(config, get_method("affinequant"), calibrated=True, nsamples=8,
                                                seqlen=128).total  # its full-precision copies are file pages too
    assert aq.activation_bytes > off.activation_bytes  # its targets are extra activations either way


def test_tied_weight_saved_under_its_other_name(tmp_path):
    # safetensors' save_model keeps one name of a tied tensor (here lm_head.weight, not the embedding's)
    from safetensors import safe_open

    from tests.helpers import make_tokenizer, tiny_model
    from qcompiler.models.loading import save_pretrained_safe

    ref = tiny_model("opt")
    folder = save_pretrained_safe(ref, make_tokenizer(), tmp_path / "opt", weights=True)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    assert "lm_head.weight" in saved and "model.decoder.embed_tokens.weight" not in saved
    model, _ = load_offloaded(str(folder), progress=False)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
