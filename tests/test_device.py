"""`--device`: parsing, moving a layer and its inputs, the CPU path's results, refusals.

The CUDA path itself needs a GPU: here the CPU runs it (results equal the default's) and the meta device stands in
for "another device" where only placement is checked."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
from tests.helpers import one_error_line, run_cli, tiny_model

from qcompiler import QCompilerError
from qcompiler.models.families import family_for
from qcompiler.quantize.calibration import LayerInputs
from qcompiler.quantize.device import on_device, resolve_device, to_device
from qcompiler.quantize.methods import get_method

NO_CUDA = not torch.cuda.is_available()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cpu") if NO_CUDA else torch.device("cuda", 0))
    for bad in ("tpu", "cuda:x", "cuda:-1", "gpu"):
        with pytest.raises(QCompilerError, match="--device must be"):
            resolve_device(bad)


@pytest.mark.skipif(not NO_CUDA, reason="PyTorch sees a CUDA device")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line(spec):
    with pytest.raises(QCompilerError, match="PyTorch sees no CUDA device"):
        resolve_device(spec)


def test_to_device_keeps_structure():
    Pair = collections.namedtuple("Pair", "cos sin")
    obj = ((torch.ones(2), None), {"mask": torch.zeros(1), "flag": True, "pos": Pair(torch.ones(1), torch.ones(1))})
    moved = to_device(obj, torch.device("meta"))
    assert moved[0][0].is_meta and moved[0][1] is None
    assert moved[1]["mask"].is_meta and moved[1]["flag"] is True
    assert isinstance(moved[1]["pos"], Pair) and moved[1]["pos"].cos.is_meta
    inputs = LayerInputs(hidden=torch.zeros(2, 3, 4), calls=[obj], call_of=[0, 0]).to(torch.device("meta"))
    assert inputs.hidden.is_meta and inputs.calls[0][1]["mask"].is_meta and inputs.call_of == [0, 0]


def test_on_device_moves_the_layer_and_puts_its_tensors_back():
    layer = tiny_model("llama").model.layers[0]
    before = dict(layer.named_parameters())
    buffers = {n: b for n, b in layer.named_buffers()}
    with pytest.raises(RuntimeError, match="inside"):
        with on_device(layer, torch.device("meta")):
            assert all(p.is_meta for p in layer.parameters())
            assert all(b.is_meta for b in layer.buffers())
            raise RuntimeError("inside")
    for n, p in layer.named_parameters():
        assert p is before[n] and not p.is_meta  # the very tensors (file-backed ones stay file-backed)
    for n, b in layer.named_buffers():
        assert b is buffers[n]
    with on_device(layer, torch.device("cpu")):  # already there: nothing moves
        assert all(p is before[n] for n, p in layer.named_parameters())


@pytest.mark.parametrize("method, options", [("gptq", {"bits": 3, "group_size": 16}),
                                             ("spqr", {"bits": 3, "group_size": 16, "stat_group_size": 16}),
                                             ("rtn", {"bits": 4, "group_size": 16})])
def test_cpu_device_equals_the_default(method, options):
    windows = [torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    results, weights = [], []
    for device in (None, torch.device("cpu")):
        model = tiny_model("llama")
        cls = get_method(method)
        result = cls(cls.Config(**options)).quantize(model, family_for(model), calibration=windows, progress=False,
                                                     device=device)
        results.append(result)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert results[0].layers.keys() == results[1].layers.keys() and results[0].layers
    for path, w in results[0].layers.items():
        other = results[1].layers[path]
        assert np.array_equal(w.qweight, other.qweight) and np.array_equal(w.scales, other.scales), path
    for n, p in weights[0].items():
        assert torch.equal(p, weights[1][n]), n
    if method != "rtn":  # the engine's per-layer times
        assert set(results[1].layer_seconds) == {f"model.layers.{i}" for i in range(2)}
        assert all(t["seconds"] >= t["forward"] >= 0 for t in results[1].layer_seconds.values())


def test_transform_methods_refuse_another_device():
    affinequant = get_method("affinequant")
    affinequant.check_device(None)
    affinequant.check_device(torch.device("cpu"))
    get_method("spqr").check_device(torch.device("cuda"))  # its solvers run there
    with pytest.raises(QCompilerError, match="affinequant trains its transforms on the CPU only"):
        affinequant.check_device(torch.device("cuda"))


@pytest.mark.parametrize("flags, words", [
    (("--device", "tpu"), ("--device", "tpu")),
    pytest.param(("--method", "gptq", "--device", "cuda"), ("cuda", "no CUDA device"),
                 marks=pytest.mark.skipif(not NO_CUDA, reason="PyTorch sees a CUDA device")),
])
def test_bad_device_is_refused_before_loading(flags, words, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", tiny_dirs("llama"), "-o", out, *flags)
    assert code != 0
    line = one_error_line(err)
    assert all(w in line for w in words), line
    assert not out.exists()


def test_export_records_the_device(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", tiny_dirs("llama"), "--method", "rtn", "--device", "cpu", "-o", out,
                           "-q", "--no-validate")
    assert code == 0, err
    assert json.loads((out / "quant_config.json").read_text())["device"] == "cpu"
