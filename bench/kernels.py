"""Kernel benchmark: `qcompiler::SpQRMatMul` vs fp32 `MatMul` vs `com.microsoft::MatMulNBits`, one ONNX Runtime
session per (variant, shape), all measured side by side in one run.

For each weight shape K×N and batch M (rows of X), single-node models on the CPU EP:

- `fp32`: `MatMul` with a random fp32 weight (MLAS sgemm);
- `spqr-w3`, `spqr-w4`: SpQRMatMul at the 3-bit and 4-bit presets (β1 = 16, 3-bit statistics with β2 = 32 / 16,
  ~1 % fp16 outliers, act-order permutation): random but well-formed weights (`tests.builders.random_weight`);
- `spqr-w3-a4`: the 3-bit weight with `accuracy_level=4` (X quantized to int8 per 32 columns, VNNI dot products);
- `nbits-a0`, `nbits-a4`: ONNX Runtime's `MatMulNBitsQuantizer` (4-bit, block 32, asymmetric) applied to the fp32
  model, at accuracy_level 0 (fp32 compute) and 4 (int8 activations).

Timing: `--repeat` rounds (default 5) of `--number` runs (default: enough for ~0.2 s per round), median of the
per-round means; the variants of one shape and batch are interleaved (each round times every variant once, in turn), with the input fed once per session (`run_with_iobuffers` is not used: the same overhead for all
rows). Effective GB/s = bytes of the weight's initializers (what a run must read) / time.

    .venv/bin/python -m bench.kernels                        # all shapes, batches 1, 16, 512
    .venv/bin/python -m bench.kernels --shapes 4096x11008 --batches 1 --variants fp32,spqr-w3,nbits-a0

Writes a markdown table to stdout and to `--output` (default `bench/results/kernels-<date>.md`, raw figures in the
same path with `.json`). Both are rewritten after every row.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]

SHAPES = ["576x1536", "1536x576", "4096x4096", "4096x11008", "11008x4096"]  # K x N
BATCHES = [1, 16, 512]

# variant -> how its single-node model is built (data, not branches in the timing loop)
SPQR_PRESETS = {
    "spqr-w3": dict(bits=3, group_size=16, stat_bits=3, stat_group_size=32, outlier_rate=0.01, permute=True),
    "spqr-w4": dict(bits=4, group_size=16, stat_bits=3, stat_group_size=16, outlier_rate=0.01, permute=True),
}
SPQR_PRESETS["spqr-w3-a4"] = SPQR_PRESETS["spqr-w3"]  # the same weight with accuracy_level 4 (int8 activations)
SPQR_PRESETS["spqr-w4-a4"] = SPQR_PRESETS["spqr-w4"]
# the quantized lm_head's tables (`--lm-head rtn --lm-head-bits 8`: 8-bit, 128-column groups; `--lm-head gptq`: 4-bit,
# 32-column groups; fp16 statistics, no outliers, stored column order), with fp32 and with int8 activations
SPQR_PRESETS["head-w8"] = dict(bits=8, group_size=128, stat_bits=0, outlier_rate=0.0, permute=False)
SPQR_PRESETS["head-w4"] = dict(bits=4, group_size=32, stat_bits=0, outlier_rate=0.0, permute=False)
SPQR_PRESETS["head-w8-a4"] = SPQR_PRESETS["head-w8"]
SPQR_PRESETS["head-w4-a4"] = SPQR_PRESETS["head-w4"]
SPQR_ACCURACY_LEVEL = {"spqr-w3-a4": 4, "spqr-w4-a4": 4, "head-w8-a4": 4, "head-w4-a4": 4}
NBITS_PRESETS = {"nbits-a0": (0, 4), "nbits-a4": (4, 4), "nbits8-a4": (4, 8)}  # (accuracy_level, bits), block 32
VARIANTS = ["fp32", *SPQR_PRESETS, *NBITS_PRESETS]


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    K, N = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="linear/MatMul")], "matmul",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        initializer=[numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def build(variant: str, K: int, N: int, w32: np.ndarray) -> onnx.ModelProto:
    """The single-node model of `variant` for a K×N weight (`w32`: the fp32 weight `[K, N]` of the MatMul rows)."""
    if variant == "fp32":
        return _matmul_model(w32)
    if variant in SPQR_PRESETS:
        from tests.builders import random_weight
        from tests.builders import single_op_model

        return single_op_model(random_weight(N=N, K=K, seed=K + N, **SPQR_PRESETS[variant]), x_shape=("M", None),
                               accuracy_level=SPQR_ACCURACY_LEVEL.get(variant, 0))
    if variant in NBITS_PRESETS:
        import onnxruntime.quantization.matmul_nbits_quantizer as mnq

        logging.getLogger().setLevel(logging.WARNING)  # the module configures INFO logging on import
        level, bits = NBITS_PRESETS[variant]
        cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, accuracy_level=level, bits=bits)
        q = mnq.MatMulNBitsQuantizer(_matmul_model(w32), bits=bits, block_size=32, is_symmetric=False,
                                     accuracy_level=level, algo_config=cfg)
        with contextlib.redirect_stdout(io.StringIO()):
            q.process()
        out = q.model.model
        if not any(n.op_type == "MatMulNBits" for n in out.graph.node):
            raise RuntimeError("MatMulNBitsQuantizer produced no MatMulNBits node")
        return out
    raise ValueError(f"unknown variant {variant!r} (one of {', '.join(VARIANTS)})")


def session(model: onnx.ModelProto, threads: int, provider: str = "CPUExecutionProvider"):
    import onnxruntime as ort

    from qcompiler.runtime import ops

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ops.session(model.SerializeToString(), providers=[provider], sess_options=so)


def calls_for(run: Callable[[], object], budget_s: float = 0.2) -> int:
    """Calls per round for ~budget_s (after one warm-up call: first-run allocations, lazy initialization, packing)."""
    run()
    t = time.perf_counter()
    run()
    one = max(time.perf_counter() - t, 1e-6)
    return max(1, min(1000, int(budget_s / one)))


def time_interleaved(runs: dict[str, Callable[[], object]], *, repeat: int, number: int) -> dict[str, float]:
    """Median over `repeat` rounds of the mean seconds per call, for each run; every round times each run once, in
    turn (so drift in clock speed, cache contents or a neighbour's load hits all of them alike, not one variant)."""
    numbers = {k: number if number > 0 else calls_for(run) for k, run in runs.items()}
    rounds: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for k, run in runs.items():
            n = numbers[k]
            t = time.perf_counter()
            for _ in range(n):
                run()
            rounds[k].append((time.perf_counter() - t) / n)
    return {k: statistics.median(v) for k, v in rounds.items()}


def write_table(rows: list[dict], meta: dict, path: Path) -> str:
    lines = [f"# SpQRMatMul kernel benchmark ({meta['date']})", "",
             f"{meta['cpu']}, {meta['threads']} threads, ONNX Runtime {meta['ort']}, CPU EP, fp32 X. "
             f"Median of {meta['repeat']} rounds. ratio = time / fp32 MatMul time (< 1: faster); "
             "GB/s = weight initializer bytes / time.", "",
             "| K×N | M | variant | µs | ratio vs fp32 | ratio vs nbits-a0 | weight MB | GB/s |",
             "|---|--:|---|--:|--:|--:|--:|--:|"]
    ref = {(r["shape"], r["M"], r["variant"]): r["seconds"] for r in rows}
    def ratio(r: dict, base: str) -> str:
        t = ref.get((r["shape"], r["M"], base))
        return f"{r['seconds'] / t:.2f}" if t else "—"

    for r in rows:
        lines.append(f"| {r['shape']} | {r['M']} | {r['variant']} | {r['seconds'] * 1e6:.0f} | {ratio(r, 'fp32')} | "
                     f"{ratio(r, 'nbits-a0')} | {r['weight_bytes'] / 1e6:.1f} | "
                     f"{r['weight_bytes'] / r['seconds'] / 1e9:.1f} |")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated KxN (default: the five of issue 5)")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="rows of X (default: 1,16,512)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"default: {','.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (default: ORT's choice)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--number", type=int, default=0, help="runs per round (default: ~0.2 s worth)")
    p.add_argument("-o", "--output", default=None)
    args = p.parse_args(argv)

    import onnxruntime as ort

    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r} (one of {', '.join(VARIANTS)})")
    date = datetime.date.today().isoformat()
    out = Path(args.output) if args.output else REPO / "bench" / "results" / f"kernels-{date}.md"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    meta = {"date": date, "cpu": cpu, "threads": args.threads or os.cpu_count(), "ort": ort.__version__,
            "repeat": args.repeat}
    rows: list[dict] = []
    rng = np.random.default_rng(0)
    for K, N in shapes:
        w32 = (rng.standard_normal((K, N), dtype=np.float32) * 0.02).astype(np.float32)
        sessions, nbytes = {}, {}
        for variant in variants:
            model = build(variant, K, N, w32)
            sessions[variant] = session(model, args.threads)
            nbytes[variant] = _weight_bytes(model)
            del model
        for M in batches:
            x = rng.standard_normal((M, K), dtype=np.float32)
            runs = {v: (lambda sess=sess: sess.run(None, {"X": x})) for v, sess in sessions.items()}
            for variant, seconds in time_interleaved(runs, repeat=args.repeat, number=args.number).items():
                rows.append({"shape": f"{K}x{N}", "K": K, "N": N, "M": M, "variant": variant, "seconds": seconds,
                             "weight_bytes": nbytes[variant]})
                print(f"{K}x{N} M={M} {variant}: {seconds * 1e6:.0f} µs", file=sys.stderr, flush=True)
            write_table(rows, meta, out)
        del sessions
    rows.sort(key=lambda r: (SHAPES.index(r["shape"]) if r["shape"] in SHAPES else 99, r["M"],
                             VARIANTS.index(r["variant"])))
    print(write_table(rows, meta, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
