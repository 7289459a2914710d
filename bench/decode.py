"""End-to-end decode speed: tokens/s of exported models through ONNX Runtime (CPU EP) with the op library.

Each model folder (a `qcompiler export` output) gets one session; every round feeds the same prompt from an empty KV
cache (prefill), then greedy-decodes `--new-tokens` tokens one at a time, feeding each step's `present.*` back as
`past_key_values.*`. All models are measured in one run, interleaved round by round (so a background load that
comes and goes hits every model alike); the table reports medians over the rounds and each model's decode speed
relative to the first folder (by default the fp32 export).

A second table times single decode steps (`session.run` of one token after the prompt's KV cache, always the same
step), alternating the models `--step-runs` times, 4 steps per turn: its median and 10th percentile show per-step
differences (a graph pass's) that the rounds' noise on this 2-core VM hides; `--threads 1` steadies it further.

    .venv/bin/python -m bench.decode                      # bench/out/{fp32,spqr-w4,spqr-w3} (bench/quality.py)
    .venv/bin/python -m bench.decode OUT1 OUT2 --threads 2 --new-tokens 64
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]

DEFAULT_MODELS = ["fp32", "spqr-w4", "spqr-w3"]
PROMPT = ("Robert Boulter is an English film, television and theatre actor. He had a guest starring role on the "
          "television series The Bill in 2000. This was followed by a starring role in the play Herons written by "
          "Simon Stephens, which was performed in 2001 at the Royal Court Theatre.")


class Model:
    """One exported folder (a `qcompiler.runtime.generate.Generator`) and its prompt ids."""

    def __init__(self, folder: Path, threads: Optional[int], prompt_tokens: int):
        from qcompiler.runtime.generate import Generator

        self.folder = folder
        self.gen = Generator(folder, threads=threads)
        self.config = json.loads((folder / "quant_config.json").read_text())
        self.tokenizer = self.gen.tokenizer
        ids = self.gen.encode(PROMPT)
        self.prompt_ids = (ids * (prompt_tokens // max(1, len(ids)) + 1))[:prompt_tokens]

    def step_feeds(self) -> dict:
        """Feeds of the decode step right after the prompt (its KV cache, its next position)."""
        import numpy as np

        g = self.gen
        out = g.session.run(g.output_names, g._feeds(np.asarray([self.prompt_ids], np.int64), g.empty_past(), 0))
        token = np.asarray([[int(out[0][0, -1].argmax())]], np.int64)
        return g._feeds(token, list(out[1:]), len(self.prompt_ids))

    def round(self, new_tokens: int) -> tuple[float, float, list[int]]:
        """(prefill s, decode s for new_tokens - 1 steps, generated ids), never stopping early."""
        res = self.gen.generate(self.prompt_ids, max_new_tokens=new_tokens, stop_at_eos=False)
        return res.prefill_s, res.decode_s, res.token_ids


def labels(folders: list[Path]) -> list[str]:
    """Row labels: each folder's name, or where two names clash, its path below the folders' common parent."""
    names = [f.name for f in folders]
    if len(set(names)) == len(names):
        return names
    paths = [f.resolve() for f in folders]
    common = Path(os.path.commonpath(paths))
    return [str(p.relative_to(common)) for p in paths]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help="exported folders (default: bench/out/{fp32,spqr-w4,spqr-w3}); the "
                                            "first is the reference of the ratio column")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default: 64)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per round (default: 64)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per model, interleaved (default: 5)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    p.add_argument("--step-runs", type=int, default=100,
                   help="alternations of the single-step timing, 4 steps per model each (default: 100; 0: skip)")
    p.add_argument("-o", "--output", default=None, help="markdown table (default: bench/results/decode-DATE.md)")
    args = p.parse_args(argv)
    folders = [Path(m) for m in args.models] or [REPO / "bench" / "out" / m for m in DEFAULT_MODELS]
    missing = [str(f) for f in folders if not (f / "model.onnx").exists()]
    if missing:
        print(f"bench/decode.py: error: no exported model in {', '.join(missing)} (run `python -m bench.quality` first, or "
              "pass `qcompiler export` output folders)", file=sys.stderr)
        return 2
    if len({f.resolve() for f in folders}) < len(folders):
        print("bench/decode.py: error: a model folder is given twice (each is timed and reported once)", file=sys.stderr)
        return 2
    if args.new_tokens < 2:
        print("bench/decode.py: error: --new-tokens must be at least 2", file=sys.stderr)
        return 2
    models = [Model(f, args.threads, args.prompt_tokens) for f in folders]
    for m in models:  # warm-up (first-call packing, allocator growth)
        m.round(4)
    times: dict[str, list[tuple[float, float]]] = {str(m.folder): [] for m in models}
    generated: dict[str, list[int]] = {}
    for r in range(args.rounds):
        for m in models:
            prefill, decode, tokens = m.round(args.new_tokens)
            times[str(m.folder)].append((prefill, decode))
            generated[str(m.folder)] = tokens
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    steps: dict[str, list[float]] = {str(m.folder): [] for m in models}
    if args.step_runs > 0:
        import time

        feeds = [m.step_feeds() for m in models]
        for _ in range(args.step_runs):
            for m, f in zip(models, feeds):
                t = time.perf_counter()
                for _ in range(4):
                    m.gen.session.run(m.gen.output_names[:1], f)
                steps[str(m.folder)].append((time.perf_counter() - t) / 4)

    rows = []
    label = dict(zip((str(m.folder) for m in models), labels(folders)))
    for m in models:
        t = times[str(m.folder)]
        prefill = statistics.median(x[0] for x in t)
        decode = statistics.median(x[1] for x in t)
        text = m.tokenizer.decode(generated[str(m.folder)][:12]) if m.tokenizer else ""
        rows.append({"model": label[str(m.folder)], "method": m.config.get("method", "?"),
                     "avg_bits": m.config.get("avg_bits"), "prefill_tok_s": args.prompt_tokens / prefill,
                     "decode_tok_s": (args.new_tokens - 1) / decode, "text": text})
    ref = rows[0]["decode_tok_s"]
    import onnxruntime

    lines = [f"# Decode speed through ONNX Runtime ({datetime.date.today().isoformat()})", "",
             f"ONNX Runtime {onnxruntime.__version__} CPU EP, intra-op threads: {args.threads or 'ORT default'}; "
             f"prompt {args.prompt_tokens} tokens, then {args.new_tokens} greedy tokens with the KV cache; median of "
             f"{args.rounds} interleaved rounds. Reproduce: `.venv/bin/python -m bench.decode "
             + " ".join(str(f) for f in args.models) + (f" --threads {args.threads}" if args.threads else "")
             + (f" --rounds {args.rounds}" if args.rounds != 5 else "") + "`.",
             "", "| model | method | avg bits | prefill tok/s | decode tok/s | decode vs first | first 12 tokens |",
             "|---|---|--:|--:|--:|--:|---|"]
    for r in rows:
        bits = f"{r['avg_bits']:.3f}" if isinstance(r["avg_bits"], (int, float)) else "32"
        text = r["text"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['model']} | {r['method']} | {bits} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} "
                     f"| {r['decode_tok_s'] / ref:.2f}× | {text} |")
    if args.step_runs > 0:
        med = {k: statistics.median(v) for k, v in steps.items()}
        first = med[str(models[0].folder)]
        lines += ["", f"One decode step (position {args.prompt_tokens}), {args.step_runs} alternations of 4 steps per "
                  "model:", "", "| model | median ms | p10 ms | median vs first |", "|---|--:|--:|--:|"]
        for m in models:
            v = sorted(steps[str(m.folder)])
            lines.append(f"| {label[str(m.folder)]} | {med[str(m.folder)] * 1e3:.2f} | {v[len(v) // 10] * 1e3:.2f} "
                         f"| {med[str(m.folder)] / first:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.output) if args.output else REPO / "bench" / "results" / f"decode-{datetime.date.today()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
