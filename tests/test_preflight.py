"""Early one-line errors for inputs that would otherwise fail late or silently (qcompiler/models/preflight.py), and odd
shapes that must simply work."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import VOCAB, assert_no_output, make_tokenizer, one_error_line, run_cli, tiny_config, tiny_model
from qcompiler import QCompilerError
from qcompiler.models import preflight
from qcompiler.quantize.methods import available_methods, get_method


def _save(model, path):
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_nan_in_weights(tmp_path, capsys):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
        model.model.layers[1].mlp.up_proj.weight[4, 5] = float("inf")
    src = _save(model, tmp_path / "src")
    code, _, err = run_cli(capsys, "export", src, "-o", tmp_path / "out", "-q")
    assert code != 0
    line = one_error_line(err)
    assert "weight model.layers.1.mlp.up_proj.weight (96, 64) holds 2 NaN/Inf value(s)" in line, line
    assert_no_output(tmp_path / "out")


def test_checkpoint_without_untied_lm_head(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    config = tiny_config("llama")
    config.tie_word_embeddings = False
    from transformers import AutoModelForCausalLM

    src = _save(AutoModelForCausalLM.from_config(config), tmp_path / "src")
    weights = load_file(src / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "export", src, "-o", tmp_path / "out", "-q")
    assert code != 0
    line = one_error_line(err)
    assert "lacks 1 weight(s) the model needs (lm_head.weight)" in line and "initialise them at random" in line
    assert "set tie_word_embeddings: true" in line
    assert_no_output(tmp_path / "out")


def test_nan_in_calibration_activations(tiny_dirs, tmp_path, text_file, capsys, monkeypatch):
    # layer 0 overflows on the calibration text (simulated with a hook writing Inf into its output): the error names
    # the layer whose input it is, before any solver sees a NaN Hessian
    from qcompiler.models import loading

    real_load = loading.load_model

    def load_overflowing(*args, **kwargs):
        model, tok = real_load(*args, **kwargs)

        def overflow(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden[..., 0] = float("inf")

        model.model.layers[0].register_forward_hook(overflow)
        return model, tok

    monkeypatch.setattr(loading, "load_model", load_overflowing)
    code, _, err = run_cli(capsys, "export", tiny_dirs("llama"), "-o", tmp_path / "out", "--method", "gptq",
                           "--calibration", text_file, "--nsamples", 2, "--seqlen", 32, "-q")
    assert code != 0
    line = one_error_line(err)
    assert "calibration activations at the input of model.layers.1 hold 64 NaN/Inf value(s) of 4096" in line, line
    assert_no_output(tmp_path / "out")


def test_memory_estimate_refuses_before_loading(tiny_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda: 100 * 1024**2)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", tiny_dirs("llama"), "-o", out, "-q")
    assert code != 0
    line = one_error_line(err)
    assert "not enough memory: this export needs ~0.6 GiB" in line and "0.1 GiB available" in line, line
    assert "--no-memory-check" in line
    assert_no_output(out)
    code, _, err = run_cli(capsys, "export", tiny_dirs("llama"), "-o", out, "-q", "--no-memory-check")
    assert code == 0, err
    assert json.loads((out / "quant_config.json").read_text())["memory_estimate_gib"] > 0.5


def test_memory_estimate_counts_parameters_and_activations():
    config = tiny_config("llama")
    model = tiny_model("llama")
    n = sum(p.numel() for p in model.parameters())  # tied embeddings are one parameter
    est = preflight.estimate_memory(config, get_method("gptq"), calibrated=True, nsamples=8, seqlen=128)
    assert est.params == n and est.param_bytes == 4 * n
    assert est.activation_bytes == 3 * 8 * 128 * 64 * 4
    assert est.total == preflight.BASE_BYTES + int(3.5 * 4 * n) + est.activation_bytes
    aq = preflight.estimate_memory(config, get_method("affinequant"), calibrated=True, nsamples=8, seqlen=128)
    assert aq.total == preflight.BASE_BYTES + int(6.0 * 4 * n) + 5 * 8 * 128 * 64 * 4
    assert preflight.estimate_memory(config, get_method("rtn"), calibrated=False, nsamples=8,
                                     seqlen=128).activation_bytes == 0
    with pytest.raises(TypeError, match="method class"):  # a name would silently get the defaults
        preflight.estimate_memory(config, "gptq", calibrated=True, nsamples=8, seqlen=128)
    with pytest.raises(QCompilerError, match="not enough memory"):
        preflight.check_memory(est, available=est.total - 1)
    preflight.check_memory(est, available=est.total)


def test_outliers_need_k_addressable_by_uint16():
    preflight.check_linear_sizes({"a": (65536, 10)}, outliers=True)
    preflight.check_linear_sizes({"a": (70000, 10)}, outliers=False)
    with pytest.raises(QCompilerError, match=r"layers.0.mlp.down_proj has 70000 input features: SpQR outliers store "
                                             r"uint16 column indices \(K ≤ 65536\); 1 linear\(s\) affected"):
        preflight.check_linear_sizes({"layers.0.mlp.down_proj": (70000, 10), "x": (64, 64)}, outliers=True)


def test_odd_hidden_sizes_export_and_validate(tmp_path, capsys):
    # hidden 72 (3 heads of 24, one KV head), MLP 100: no dimension is a multiple of 32 or of the group size, so every
    # linear has ragged groups and ragged packed chunks; the export's own ORT-vs-PyTorch validation must pass.
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=128)
    src = _save(AutoModelForCausalLM.from_config(config).eval(), tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", src, "-o", out, "--method", "rtn", "--bits", "3", "--group-size", "32",
                           "-q")
    assert code == 0, err
    cfg = json.loads((out / "quant_config.json").read_text())
    assert cfg["n_quantized_layers"] == 14 and cfg["validation"]["max_abs_logit_diff"] <= cfg["validation"]["limit"]
    # heads of 24: ONNX Runtime's GroupQueryAttention takes multiples of 16 only, so attention stays standard ops
    assert "GroupQueryAttention" not in cfg["contrib_ops"]
    assert not json.loads((out / "genai_config.json").read_text())["search"]["past_present_share_buffer"]


def test_output_folder_gets_umask_permissions_not_mkdtemp_ones(tmp_path):
    # mkdtemp's 0700 folder and a writer's 0600 file must not reach OUT: a server running as another user reads it
    import os
    import stat

    from qcompiler.folder import atomic_output

    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "out", force=False) as tmp:
            (tmp / "sub").mkdir()
            fd = os.open(tmp / "model.onnx.data", os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
            (tmp / "sub" / "f.json").write_text("{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    out = tmp_path / "out"
    assert mode(out) == 0o755 and mode(out / "sub") == 0o755
    assert mode(out / "model.onnx.data") == 0o644 and mode(out / "sub" / "f.json") == 0o644


def test_available_memory_is_capped_by_the_cgroup_limit(monkeypatch):
    monkeypatch.setattr(preflight, "_cgroup_headroom", lambda: 123 * 1024**2)
    assert preflight.available_memory() == 123 * 1024**2
    monkeypatch.setattr(preflight, "_cgroup_headroom", lambda: None)
    assert preflight.available_memory() > 123 * 1024**2



def test_available_memory_sees_a_memory_cgroup_around_the_process(tmp_path):
    """In a real memory cgroup (v1 or v2, made by the bench's MemoryCap where the tree is writable), a child's
    `available_memory` is at most the cap (not the machine's free memory) and not eaten by a file it read."""
    import os
    import sys

    from bench.large_model import MemoryCap, run_child

    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(64 * 2**20))
    try:
        cap = MemoryCap(2**30)
    except SystemExit as e:
        pytest.skip(f"no writable memory cgroup here: {e}")
    code = (f"from qcompiler.models.preflight import available_memory; open({str(blob)!r}, 'rb').read(); "
            "print(available_memory())")
    try:
        run = run_child([sys.executable, "-c", code], tmp_path / "log", cap)
    finally:
        cap.close()
    assert run["code"] == 0, (tmp_path / "log").read_text()
    seen = int((tmp_path / "log").read_text().split()[-1])
    assert 2**28 < seen <= 2**30


# The memory model of before issue 24 (preflight's tables keyed by method name): the values each method class now
# declares (`Method.memory_*`) must reproduce it.
_PARAM_FACTOR = {"affinequant": 6.0, "affinequant+spqr": 6.0}
_OFFLOAD_PARAM_FACTOR = {"rtn": 0.75, "gptq": 0.75, "spqr": 0.75, "affinequant": 1.0, "affinequant+spqr": 1.0}
_ACTIVATION_COPIES = {"affinequant": 5, "affinequant+spqr": 5}


@pytest.mark.parametrize("name", available_methods())
def test_memory_model_declared_by_each_method(name):
    config = tiny_config("llama")
    n = preflight.count_parameters(config)
    method = get_method(name)
    for offload in (False, True):
        est = preflight.estimate_memory(config, method, calibrated=True, nsamples=8, seqlen=128, offload=offload)
        factor = (_OFFLOAD_PARAM_FACTOR[name] if offload and name in _OFFLOAD_PARAM_FACTOR
                  else _PARAM_FACTOR.get(name, 3.5))
        copies = _ACTIVATION_COPIES.get(name, 3)
        assert est.total == preflight.BASE_BYTES + int(factor * 4 * n) + copies * 8 * 128 * 64 * 4, offload
    assert method.learns_transforms == (name in ("affinequant", "affinequant+spqr"))
