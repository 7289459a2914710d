"""Time per decoder layer of GPTQ and SpQR on a Llama-3-8B-shaped model (its first layers), on `--device`.

The model is built in memory with random weights (LLaMA, hidden 4096, MLP 14336, 32 query / 8 KV heads, vocabulary
128256, untied embeddings: Llama-3-8B's shapes) but only its first `--layers` decoder layers; the calibration windows
are random token ids (the weights are random, so the text does not matter; the work per window is the same). Each
method runs `Method.quantize` with the calibration engine (qcompiler/quantize/calibration.py) and reports the
engine's per-layer wall time, split into calibration forwards and solves, plus this process's peak RSS. Methods run
one after another on a freshly built model (the same seed).

    .venv/bin/python -m bench.layer_solve                                   # gptq + spqr, 2 layers, 16 × 512, cpu
    .venv/bin/python -m bench.layer_solve --methods gptq --device cuda --nsamples 128 --seqlen 2048

Writes bench/results/layer-solve-DATE.md and .json (`-o` for another name).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9

# what each method runs with: GPTQ's defaults (4-bit, g128, act order) and SpQR's near-lossless preset
OPTIONS = {"gptq": {}, "spqr": {"bits": 4}}


def build(args):
    """The first `args.layers` decoder layers of an 8B-shaped LLaMA with random weights (eval mode, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seqlen, 8192),
                         rope_theta=500000.0, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.layer_solve", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="gptq,spqr", help="comma-separated (default: gptq,spqr)")
    p.add_argument("--device", default="cpu", help="--device of the export (default: cpu)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", type=Path, default=None, help="results .md (a .json beside it)")
    args = p.parse_args(argv)
    out_md = args.output or REPO / "bench" / "results" / f"layer-solve-{datetime.date.today().isoformat()}.md"

    import torch

    from qcompiler.emit import jsonable
    from qcompiler.models.families import family_for
    from qcompiler.quantize.device import resolve_device
    from qcompiler.quantize.methods import get_method

    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    windows = [torch.randint(0, args.vocab, (1, args.seqlen), generator=g) for _ in range(args.nsamples)]
    runs: list = []
    text = ""
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        tick = time.perf_counter()
        model = build(args)
        built = time.perf_counter() - tick
        params = sum(p.numel() for p in model.model.layers.parameters()) // args.layers
        cls = get_method(method)
        config = cls.Config(**OPTIONS.get(method, {}))
        print(f"{method}: {config}", flush=True)
        tick = time.perf_counter()
        result = cls(config).quantize(model, family_for(model), calibration=windows, progress=True, device=device)
        total = time.perf_counter() - tick
        runs.append({"method": method, "config": jsonable(dataclasses.asdict(config)),
                     "build_seconds": built, "quantize_seconds": total, "params_per_layer": params,
                     "layers": result.layer_seconds, "avg_bits": result.totals["avg_bits"],
                     "rel_error": result.totals["rel_error"],
                     "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB})
        print(json.dumps(runs[-1]["layers"], indent=1), flush=True)
        del model, result
        text = write(out_md, args, runs, device, argv or sys.argv[1:])  # after each method: a long run keeps them

    print(text)
    return 0


def write(out_md: Path, args, runs: list, device, argv) -> str:
    """The results table (.md) and data (.json) of the runs so far."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": str(device), "cpu": cpu,
            "cores": torch.get_num_threads(), "torch": torch.__version__, "argv": argv,
            "shape": {"hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
                      "kv_heads": args.kv_heads, "vocab": args.vocab, "layers": args.layers},
            "calibration": f"{args.nsamples} × {args.seqlen} random token ids (seed {args.seed})"}
    lines = [f"# Time per decoder layer, Llama-3-8B shapes, first {args.layers} layers, one run", "",
             f"`.venv/bin/python -m bench.layer_solve {' '.join(meta['argv'])}` — {meta['date']}, device "
             f"{meta['device']} ({cpu}, {meta['cores']} torch threads), torch {torch.__version__}.", "",
             f"Model: LLaMA hidden {args.hidden}, MLP {args.intermediate}, {args.heads}/{args.kv_heads} heads, "
             f"vocabulary {args.vocab}, random weights ({runs[0]['params_per_layer'] / 1e6:.0f}M parameters per "
             f"decoder layer); calibration {meta['calibration']}. \"forward\" = the engine's calibration forwards "
             "(Hessians, next layer's inputs), \"solve\" = the rest (the solvers).", "",
             "| method | layer | seconds | forward | solve | bits/param | mean rel. error | process peak RSS so far |",
             "|---|---|--:|--:|--:|--:|--:|--:|"] if runs else []
    for run in runs:
        for layer, t in run["layers"].items():
            lines.append(f"| {run['method']} | {layer} | {t['seconds']:.1f} | {t['forward']:.1f} | {t['solve']:.1f} "
                         f"| {run['avg_bits']:.3f} | {run['rel_error']:.4f} | {run['peak_rss_gb']:.1f} GB |")
    text = "\n".join(lines) + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    out_md.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1, default=str) + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
