"""Greedy agreement of two exported folders: does the fused graph (GroupQueryAttention, shared KV buffer, fused norms)
generate the tokens the standard-op graph (`--no-contrib-ops`) generates?

For each prompt (the first `--prompts` WikiText-2 test rows of at least `--prompt-tokens` tokens, cut to that length)
both folders greedy-decode `--new-tokens` tokens through `qcompiler generate`'s runtime (`Generator`: shared buffer
where the graph has GroupQueryAttention, presents fed back otherwise). Where the sequences first differ, the table
gives the reference's top-2 logit margin at that step: a near tie (margin within the two graphs' logit difference)
explains a difference that is not an error. Also the largest |Δlogit| of the two over the prefill of each prompt.

    .venv/bin/python -m bench.greedy_agreement FUSED STANDARD [--prompts 8] [--new-tokens 64]

Writes bench/results/greedy-agreement-DATE.md (or `--output`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    from qcompiler.data import EVAL_FILE, require_data_file

    rows = json.loads(Path(require_data_file(EVAL_FILE, "no WikiText-2 test rows")).read_text())
    found = []
    for row in rows:
        ids = tokenizer(row.strip())["input_ids"] if row.strip() else []
        if len(ids) >= length:
            found.append(list(ids[:length]))
        if len(found) == count:
            break
    return found


def greedy(gen, prompt: list[int], new: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits row each was picked from."""
    from qcompiler.runtime.generate import _Concatenated, _SharedBuffer

    step = _SharedBuffer(gen, len(prompt) + new) if gen.shared_buffer else _Concatenated(gen)
    logits = step(np.asarray([prompt], np.int64), 0)
    prefill = logits[0]
    tokens, rows = [], []
    for pos in range(len(prompt), len(prompt) + new):
        row = logits[0, -1]
        rows.append(row)
        tokens.append(int(np.argmax(row)))
        if len(tokens) < new:
            logits = step(np.asarray([[tokens[-1]]], np.int64), pos)
    return tokens, [prefill, *rows]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.greedy_agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("fused", type=Path)
    p.add_argument("standard", type=Path)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("-o", "--output", type=Path, default=None)
    args = p.parse_args(argv)
    from qcompiler.runtime.generate import Generator

    fused, standard = Generator(args.fused), Generator(args.standard)
    cases = prompts(fused.tokenizer, args.prompts, args.prompt_tokens)
    lines = [f"# Greedy agreement: {args.fused.name} vs {args.standard.name} ({datetime.date.today()})", "",
             f"`{args.fused}` (KV: {fused.describe()}) against `{args.standard}` (KV: {standard.describe()}); "
             f"{len(cases)} WikiText-2 test rows cut to {args.prompt_tokens} tokens, {args.new_tokens} greedy tokens "
             "each. Reproduce: `.venv/bin/python -m bench.greedy_agreement " + " ".join(sys.argv[1:] if argv is None
                                                                                     else argv) + "`.", "",
             "| prompt | same tokens | first difference at | reference top-2 margin there | max \\|Δlogit\\| (prefill) "
             "| max \\|Δlogit\\| (steps before the difference) |", "|--:|--:|--:|--:|--:|--:|"]
    for folder in (args.fused, args.standard):
        cfg = json.loads((folder / "quant_config.json").read_text())
        flag = "" if cfg.get("contrib_ops") else " --no-contrib-ops"
        lines.insert(-3, f"- `{folder}`: `qcompiler export {cfg['source']} --method {cfg['method']}{flag}` "
                         f"(quant_config.json: contrib ops {cfg.get('contrib_ops') or 'none'}, "
                         f"{cfg['avg_bits']:.3f} bits/param)")
    lines.insert(-3, "")
    agree = 0
    for i, prompt in enumerate(cases):
        a, a_rows = greedy(fused, prompt, args.new_tokens)
        b, b_rows = greedy(standard, prompt, args.new_tokens)
        first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        prefill = float(np.abs(a_rows[0] - b_rows[0]).max())
        upto = len(a) if first is None else first + 1
        steps = max(float(np.abs(a_rows[1 + k] - b_rows[1 + k]).max()) for k in range(upto))
        if first is None:
            agree += 1
            lines.append(f"| {i} | {len(a)}/{len(a)} | — | — | {prefill:.2e} | {steps:.2e} |")
        else:
            top2 = np.sort(b_rows[1 + first])[-2:]
            lines.append(f"| {i} | {first}/{len(a)} | {first} | {top2[1] - top2[0]:.2e} | {prefill:.2e} | {steps:.2e} |")
        print(lines[-1], file=sys.stderr)
    lines += ["", f"{agree} of {len(cases)} prompts identical over all {args.new_tokens} tokens. A difference whose "
              "reference margin is within the steps' |Δlogit| is a near tie (either token is the argmax within "
              "rounding)."]
    out = args.output or REPO / "bench" / "results" / f"greedy-agreement-{datetime.date.today()}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
