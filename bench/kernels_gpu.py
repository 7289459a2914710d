"""GPU kernel benchmark (ONNX Runtime's CUDA EP), side by side in one run: `qcompiler::SpQRMatMul` (3-bit and 4-bit
presets, ~1 % outliers) vs fp16 `MatMul` (cuBLAS) vs `com.microsoft::MatMulNBits` 4-bit (CUDA), fp16 X, plus the
device's measured copy bandwidth.

Each variant's model holds `copies` instances of the layer side by side on one X, so that one run streams at least
`--stream-mb` of weights (default 512 MB: several times any GPU's L2; a single 22 MB 3-bit 4096×11008 weight would
stay in an H100's 50 MB L2 from run to run and time L2, not memory). The copies share their values but are distinct
initializers, hence distinct device buffers. X and the outputs are bound to device memory (IOBinding) and the session
captures a CUDA graph (`enable_cuda_graph`), so a run is `copies` kernels behind one graph launch; `--no-cuda-graph`
times plain runs instead. Time per layer = median over rounds of (time per run) / copies.

Printed per shape and batch: µs per layer, the ratio to fp16 cuBLAS, effective GB/s of each variant's weight bytes,
and that as a share of the copy bandwidth (device-to-device copy, bytes read + written, timed by torch with CUDA
events). The issue's GPU target: SpQR 3-bit decode (batch 1) at ≥ 60 % of copy bandwidth and faster than fp16 cuBLAS
at 4096×11008.

    python -m bench.kernels_gpu                                   # 4096x11008 and 11008x4096, batches 1, 16, 512
    python -m bench.kernels_gpu --shapes 4096x11008 --batches 1 -o $OUT/kernels-gpu.md
    python -m bench.kernels_gpu --variants fp16,spqr-w3 --gemv-x slabs,rows --gemv-rows 2,1 --prefill-tile 64,128

Needs a CUDA GPU, onnxruntime-gpu, torch with CUDA (for the copy bandwidth) and the op library built with CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
from bench.kernels import SPQR_PRESETS  # the same presets as the CPU benchmark

SHAPES = ["4096x11008", "11008x4096"]  # K x N
BATCHES = [1, 16, 512]
VARIANTS = ["fp16", "spqr-w3", "spqr-w4", "nbits"]


def _layers_model(nodes, inits, K: int, N: int, opsets) -> onnx.ModelProto:
    """One fp16 input X [M, K], the nodes' outputs Y0.. [M, N] (one per node)."""
    graph = helper.make_graph(
        nodes, "layers", [helper.make_tensor_value_info("X", TensorProto.FLOAT16, ["M", K])],
        [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT16, ["M", N]) for i in range(len(nodes))],
        initializer=inits)
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def _fp16_layers(w16: np.ndarray, copies: int) -> onnx.ModelProto:
    K, N = w16.shape
    nodes = [helper.make_node("MatMul", ["X", f"W{i}"], [f"Y{i}"], name=f"layer{i}/MatMul") for i in range(copies)]
    inits = [numpy_helper.from_array(w16, f"W{i}") for i in range(copies)]
    return _layers_model(nodes, inits, K, N, [helper.make_opsetid("", 17)])


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers (what one run must read)."""
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def build(variant: str, K: int, N: int, copies: int, w16: np.ndarray) -> onnx.ModelProto:
    """`copies` instances of the K×N layer of `variant` on one fp16 input X `[M, K]`, outputs Y0.. `[M, N]`."""
    if variant == "fp16":
        return _fp16_layers(w16, copies)
    if variant in SPQR_PRESETS:
        from tests.builders import random_weight
        from qcompiler.graph.format import DOMAIN, OPSET_VERSION
        from qcompiler.graph.onnx_op import spqr_node

        w = random_weight(N=N, K=K, seed=K + N, **SPQR_PRESETS[variant])
        nodes, inits = [], []
        for i in range(copies):
            node, init = spqr_node(w, x="X", y=f"Y{i}", prefix=f"layer{i}", bias_dtype=np.float16)
            nodes.append(node)
            inits += init
        return _layers_model(nodes, inits, K, N, [helper.make_opsetid("", 18),
                                                  helper.make_opsetid(DOMAIN, OPSET_VERSION)])
    if variant == "nbits":
        import onnxruntime.quantization.matmul_nbits_quantizer as mnq

        logging.getLogger().setLevel(logging.WARNING)
        cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, accuracy_level=0, bits=4)
        q = mnq.MatMulNBitsQuantizer(_fp16_layers(w16, copies), bits=4, block_size=32, is_symmetric=False,
                                     algo_config=cfg)
        with contextlib.redirect_stdout(io.StringIO()):
            q.process()
        out = q.model.model
        if sum(n.op_type == "MatMulNBits" for n in out.graph.node) != copies:
            raise RuntimeError("MatMulNBitsQuantizer did not quantize every MatMul")
        return out
    raise ValueError(f"unknown variant {variant!r} (one of {', '.join(VARIANTS)})")


def copies_for(one_layer_bytes: int, stream_mb: float) -> int:
    return max(1, math.ceil(stream_mb * 1e6 / one_layer_bytes))


def copy_bandwidth_gbs(mb: int = 1024, repeat: int = 20) -> float:
    """Device-to-device copy: (bytes read + bytes written) / time, median of `repeat`, in GB/s."""
    import torch

    src = torch.empty(mb * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times) / 1e9


class GpuRun:
    """A CUDA EP session of `model` with X and the outputs bound to device memory; `__call__` runs it once."""

    def __init__(self, model: onnx.ModelProto, x: np.ndarray, *, cuda_graph: bool):
        import onnxruntime as ort

        from qcompiler.runtime import ops

        so = ort.SessionOptions()
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        opts = {"enable_cuda_graph": "1"} if cuda_graph else {}
        self.sess = ops.session(model.SerializeToString(), providers=[("CUDAExecutionProvider", opts)],
                                sess_options=so)
        self.io = self.sess.io_binding()
        self.x = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        self.io.bind_ortvalue_input("X", self.x)
        N = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
        self.ys = [ort.OrtValue.ortvalue_from_shape_and_type([x.shape[0], N], np.float16, "cuda", 0)
                   for _ in model.graph.output]
        for out, y in zip(model.graph.output, self.ys):
            self.io.bind_ortvalue_output(out.name, y)
        self()  # warm-up; with a CUDA graph: the capture

    def __call__(self) -> None:
        self.sess.run_with_iobinding(self.io)  # returns once the stream is done


def time_run(run: GpuRun, *, repeat: int, number: int) -> float:
    """Median over `repeat` rounds of the mean seconds per run."""
    rounds = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            run()
        rounds.append((time.perf_counter() - t) / number)
    return statistics.median(rounds)


# the launcher's choices a benchmark can force, by option: (option attribute, variable, label, batches it applies to)
LAUNCH_CHOICES = (("gemv_x", "QCOMPILER_CUDA_GEMV_X", "x", lambda M: M <= 8),
                  ("gemv_rows", "QCOMPILER_CUDA_GEMV_ROWS", "rows", lambda M: M <= 8),
                  ("prefill_tile", "QCOMPILER_CUDA_PREFILL_TILE", "tile", lambda M: M >= 9))


def launch_settings(args, M: int) -> list:
    """(label suffix, environment) of each SpQR launch setting to time at batch M: the default (suffix ""), then each
    value of the options that apply at M: --gemv-x, --gemv-rows at M <= 8 (suffix " [x=slabs]", " [rows=2]"),
    --prefill-tile from 9 rows (" [tile=128]")."""
    out = [("", {})]
    for attr, variable, name, applies in LAUNCH_CHOICES:
        if applies(M):
            out += [(f" [{name}={v}]", {variable: v}) for v in getattr(args, attr).split(",") if v and v != "default"]
    return out


@contextlib.contextmanager
def launch_environment(env: dict):
    """The launcher reads these variables at each launch (so at graph capture): set only while a run is made."""
    for _, v, _, _ in LAUNCH_CHOICES:
        os.environ.pop(v, None)
    os.environ.update(env)
    try:
        yield
    finally:
        for _, v, _, _ in LAUNCH_CHOICES:
            os.environ.pop(v, None)


def gpu_bench_arguments(p: argparse.ArgumentParser, variants: list) -> None:
    """The options this benchmark shares with bench/kernels_cuda_direct.py."""
    p.add_argument("--shapes", default=",".join(SHAPES), help="K x N, comma-separated")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--variants", default=",".join(variants))
    p.add_argument("--stream-mb", type=float, default=512, help="weight bytes per run, per variant (default 512)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--number", type=int, default=20, help="runs (graph replays) per round (default 20)")
    p.add_argument("--gemv-x", default="default",
                   help="SpQR at batch <= 8: the decode GEMV's X staging modes to time besides its default, "
                        "comma-separated, of resident, slabs, rows (QCOMPILER_CUDA_GEMV_X; a mode that does not fit "
                        "falls back)")
    p.add_argument("--gemv-rows", default="default",
                   help="SpQR at batch <= 8: the decode GEMV's rows per warp to time besides its default choice, "
                        "comma-separated, of 4, 2, 1 (QCOMPILER_CUDA_GEMV_ROWS; a count the tile does not offer "
                        "falls back)")
    p.add_argument("--prefill-tile", default="default",
                   help="SpQR from batch 9 (fp16): the prefill kernel's tiles to time besides its default choice, "
                        "comma-separated, of 64, 128 (QCOMPILER_CUDA_PREFILL_TILE)")
    p.add_argument("-o", "--output", type=Path, default=None, help="also write the table here (and .json)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpu_bench_arguments(p, VARIANTS)
    p.add_argument("--no-cuda-graph", action="store_true", help="time plain runs (no CUDA graph capture)")
    args = p.parse_args(argv)

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        p.error("ONNX Runtime has no CUDA EP here (install onnxruntime-gpu)")
    copy_gbs = copy_bandwidth_gbs()
    lines = [f"device copy bandwidth (read + write): {copy_gbs:.0f} GB/s; CUDA graph: {not args.no_cuda_graph}", "",
             "| K×N | batch | variant | µs / layer | vs fp16 | weight MB | GB/s | % of copy bw |",
             "|---|--:|---|--:|--:|--:|--:|--:|"]
    print("\n".join(lines), flush=True)
    rows = []
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        K, N = map(int, shape.lower().split("x"))
        w16 = (rng.standard_normal((K, N)) / math.sqrt(K)).astype(np.float16)
        models = {}
        for v in args.variants.split(","):
            one = build(v, K, N, 1, w16)
            copies = copies_for(weight_bytes(one), args.stream_mb)
            models[v] = (build(v, K, N, copies, w16), copies, weight_bytes(one))
        for M in map(int, args.batches.split(",")):
            x = rng.standard_normal((M, K)).astype(np.float16)
            base = None
            runs = [(v, v + suffix, env) for v in models
                    for suffix, env in (launch_settings(args, M) if v.startswith("spqr") else [("", {})])]
            for v, label, env in runs:
                model, copies, nbytes = models[v]
                try:
                    with launch_environment(env):  # (plain runs read it at each launch)
                        run = GpuRun(model, x, cuda_graph=not args.no_cuda_graph)
                        t = time_run(run, repeat=args.repeat, number=args.number) / copies
                except Exception as e:  # a variant that does not run here is reported, not fatal
                    line = f"| {shape} | {M} | {label} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} |"
                    print(line, flush=True)
                    lines.append(line)
                    continue
                if v == "fp16":
                    base = t
                gbs = nbytes / t / 1e9
                row = dict(shape=shape, M=M, variant=label, us=t * 1e6, copies=copies, weight_mb=nbytes / 1e6,
                           gbs=gbs, pct_copy=100 * gbs / copy_gbs, vs_fp16=t / base if base else float("nan"))
                rows.append(row)
                line = (f"| {shape} | {M} | {label} | {row['us']:.1f} | {row['vs_fp16']:.2f}× | "
                        f"{row['weight_mb']:.1f} | {gbs:.0f} | {row['pct_copy']:.0f} % |")
                print(line, flush=True)
                lines.append(line)
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")
        args.output.with_suffix(".json").write_text(json.dumps(dict(copy_gbs=copy_gbs, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
