"""GPU kernel benchmark without ONNX Runtime: the SpQRMatMul CUDA launcher called directly (tests/cuda_direct.py:
built by nvcc for the GPU at hand, PyTorch's device buffers) vs PyTorch's fp16 matmul (cuBLAS), side by side in one
run, plus the device's copy bandwidth. For a GPU machine without onnxruntime-gpu (bench/kernels_gpu.py needs it and
adds MatMulNBits CUDA).

Each variant streams at least `--stream-mb` of weights per run (default 512 MB, several times any GPU's L2): that many
distinct device copies of the layer on one X, their launches captured in one CUDA graph; time per layer = median over
rounds of (graph replay time, CUDA events) / copies. Printed per shape and batch: µs per layer, the ratio to fp16
cuBLAS, effective GB/s of the variant's weight bytes and that as a share of the copy bandwidth (device-to-device,
bytes read + written), and the max error of one copy's output against the NumPy reference (relative to max |ref|).
The issue's GPU target: SpQR 3-bit decode (batch 1) at ≥ 60 % of copy bandwidth and faster than fp16 cuBLAS at
4096×11008 (K×N).

    python -m bench.kernels_cuda_direct -o $OUT/kernels-cuda-direct.md
    python -m bench.kernels_cuda_direct --shapes 4096x11008,11008x4096 --batches 1 --gemv-x slabs --gemv-rows 4,2,1

Needs PyTorch with CUDA and nvcc (the project's Python package on PYTHONPATH: numpy and onnx are the only imports).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
from bench.kernels import SPQR_PRESETS  # the same presets as the CPU and ORT-GPU benchmarks
from bench.kernels_gpu import (copies_for, copy_bandwidth_gbs, gpu_bench_arguments, launch_environment,
                         launch_settings)

VARIANTS = ["spqr-w3", "spqr-w4"]


def weight_bytes(w) -> int:
    """Bytes of the SpQR weight as stored (SpQRWeight.stored_bits: codes, statistics, outliers, permutation) plus its
    bias, as the ORT benchmark's initializers count them."""
    return sum(w.stored_bits().values()) // 8 + (0 if w.bias is None else int(w.bias.nbytes))


def time_graph(fn, *, repeat: int, number: int) -> float:
    """Seconds per call of `fn` (enqueues work on the current stream): one eager run on a side stream, then `fn`
    captured in a CUDA graph and replayed `number` times per round; median over `repeat` rounds."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            graph.replay()
        end.record()
        end.synchronize()
        rounds.append(start.elapsed_time(end) / 1e3 / number)
    return statistics.median(rounds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpu_bench_arguments(p, VARIANTS)
    args = p.parse_args(argv)

    import torch

    from tests import cuda_direct
    from tests.builders import random_weight

    arch = cuda_direct.gpu_arch()
    if arch is None:
        p.error("PyTorch sees no CUDA device")
    kernel = cuda_direct.DirectKernel(cuda_direct.build(arch))
    copy_gbs = copy_bandwidth_gbs()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lines = [f"{torch.cuda.get_device_name()} ({arch}); copy bandwidth (read + write): {copy_gbs:.0f} GB/s; "
             f"CUDA graphs of `copies` layers, ≥ {args.stream_mb:.0f} MB of weights per replay", "",
             "| K×N | batch | variant | µs / layer | vs fp16 cuBLAS | weight MB | GB/s | % of copy bw | max error |",
             "|---|--:|---|--:|--:|--:|--:|--:|--:|"]
    print("\n".join(lines), flush=True)
    rows = []
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        K, N = map(int, shape.lower().split("x"))
        weights = {v: random_weight(N=N, K=K, seed=K + N, **SPQR_PRESETS[v]) for v in args.variants.split(",")}
        w16 = (torch.randn(K, N, device="cuda") / math.sqrt(K)).half()
        for M in map(int, args.batches.split(",")):
            x_np = rng.standard_normal((M, K)).astype(np.float16)
            x = torch.from_numpy(x_np).cuda()
            copies = copies_for(K * N * 2, args.stream_mb)
            ws = [w16.clone() for _ in range(copies)]
            ys = [torch.empty(M, N, device="cuda", dtype=torch.float16) for _ in range(copies)]
            base = time_graph(lambda: [torch.matmul(x, w, out=y) for w, y in zip(ws, ys)], repeat=args.repeat,
                              number=args.number) / copies
            refs = {v: w.matmul(x_np.astype(np.float32)) for v, w in weights.items()}  # once per variant and batch
            # the default's launch shape in its label (the launcher's choice for this GPU; fp16 X, as timed here)
            chosen = (f" (rows={kernel.gemv_rows_per_warp(M, N, sms)})" if M <= 8 else
                      f" (tile={128 if kernel.prefill_uses_large_tile(M, N, sms) else 64})")
            runs = [("fp16", "fp16", None, {})] + [(v, v + (suffix or chosen), w, env) for v, w in weights.items()
                                                   for suffix, env in launch_settings(args, M)]
            for v, label, w, env in runs:
                if w is None:
                    t, nbytes, err = base, K * N * 2, float("nan")
                else:
                    try:
                        with launch_environment(env):  # read at each launch, so at graph capture
                            nbytes = weight_bytes(w)
                            n = copies_for(nbytes, args.stream_mb)
                            launches = [kernel.launch(w, x_np, x_device=x) for _ in range(n)]
                            launches[0]()
                            ref = refs[v]
                            err = float(np.abs(launches[0].output().astype(np.float32) - ref).max() /
                                        np.abs(ref).max())
                            t = time_graph(lambda: [launch() for launch in launches], repeat=args.repeat,
                                           number=args.number) / n
                    except Exception as e:  # a variant that does not run is reported, not fatal
                        why = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                        line = f"| {shape} | {M} | {label} | failed: {why} |"
                        print(line, flush=True)
                        lines.append(line)
                        continue
                gbs = nbytes / t / 1e9
                row = dict(shape=shape, M=M, variant=label, us=t * 1e6, vs_fp16=t / base, weight_mb=nbytes / 1e6,
                           gbs=gbs, pct_copy=100 * gbs / copy_gbs, max_error=err)
                rows.append(row)
                line = (f"| {shape} | {M} | {label} | {row['us']:.1f} | {row['vs_fp16']:.2f}× | "
                        f"{row['weight_mb']:.1f} | {gbs:.0f} | {row['pct_copy']:.0f} % | {err:.2g} |")
                print(line, flush=True)
                lines.append(line)
            torch.cuda.empty_cache()
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")
        args.output.with_suffix(".json").write_text(json.dumps(dict(copy_gbs=copy_gbs, arch=arch, rows=rows),
                                                               indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
