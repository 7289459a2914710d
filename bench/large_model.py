"""A > 2 GB export end to end: synthetic wide LLaMA config with random weights → `qcompiler export` → ONNX Runtime.

ONNX protobufs stop at 2 GiB, so a model this size only works if every stage keeps its tensors as external data:
the export, the passes, the emitted `model.onnx` + `model.onnx.data`, the validation session and a reload. The
default config has a 300k vocabulary with untied embeddings (2 × 307M fp32 parameters that stay fp32 after
quantization, so the emitted data file itself is > 2 GB) and two decoder layers (quantized).

Prints (and writes to bench/results/large-model-<date>.md): parameters, source size, export wall time, export peak
RSS (the child process's high-water mark), emitted sizes, the export's ORT-vs-PyTorch logit check, and a reload +
forward in a fresh ONNX Runtime session with the op library (its time and this process's peak RSS).

    .venv/bin/python -m bench.large_model [--vocab 256000 --hidden 1024 --layers 2] [--method rtn] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

GB = 1e9


def make_source(folder: Path, *, vocab: int, hidden: int, layers: int, intermediate: int, seed: int) -> int:
    """Save a random-weight LLaMA (untied embeddings) and a word-level tokenizer of `vocab` words to `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 256), max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.large_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=300000)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--method", default="rtn", help="qcompiler export method (default: rtn)")
    p.add_argument("--flags", default="--bits 4 --group-size 128", help="extra export flags")
    p.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    p.add_argument("-o", "--output", default=None, help="markdown file (default: bench/results/large-model-<date>.md)")
    args = p.parse_args(argv)
    out_md = Path(args.output or REPO / "bench" / "results" / f"large-model-{datetime.date.today().isoformat()}.md")

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qcompiler-large-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []
    try:
        src, out = work / "src", work / "out"
        t = time.perf_counter()
        if not (src / "config.json").exists():
            params = make_source(src, vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                                 intermediate=args.intermediate, seed=0)
        else:
            from transformers import AutoConfig

            from qcompiler.models.preflight import count_parameters

            params = count_parameters(AutoConfig.from_pretrained(src))
        rows += [("config", f"LLaMA vocab {args.vocab}, hidden {args.hidden}, MLP {args.intermediate}, "
                            f"{args.layers} layers, untied embeddings"),
                 ("parameters", f"{params / 1e6:.0f}M ({params * 4 / GB:.2f} GB fp32)"),
                 ("source folder", f"{_size(src) / GB:.2f} GB (written in {time.perf_counter() - t:.0f} s)")]
        print("\n".join(f"{k}: {v}" for k, v in rows), flush=True)

        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "qcompiler.cli", "export", str(src), "--method", args.method,
               *args.flags.split(), "-o", str(out), "-q"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        secs = time.perf_counter() - t
        child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"export failed ({proc.returncode})")
        cfg = json.loads((out / "quant_config.json").read_text())
        val = cfg["validation"]
        rows += [("export", f"`{' '.join(cmd[2:4])} ... --method {args.method} {args.flags}`: {secs:.0f} s, "
                            f"peak RSS {child_peak / GB:.2f} GB (estimate before loading: "
                            f"{cfg['memory_estimate_gib'] * 2**30 / GB:.2f} GB)"),
                 ("emitted", f"model.onnx {_size(out / 'model.onnx') / 1e6:.2f} MB + model.onnx.data "
                             f"{_size(out / 'model.onnx.data') / GB:.2f} GB ({_size(out / 'model.onnx.data') / 2**31:.2f} × 2 GiB); {cfg['n_quantized_layers']} quantized linears, "
                             f"{cfg['avg_bits']:.3f} bits/param"),
                 ("validation (in the export)", f"max \\|logit diff\\| ORT vs PyTorch {val['max_abs_logit_diff']:.3g} "
                                                f"(limit {val['limit']:.3g})")]

        from qcompiler.runtime.generate import Generator

        t = time.perf_counter()
        gen = Generator(out)
        load_s = time.perf_counter() - t
        res = gen.generate(list(range(3, 35)), max_new_tokens=4, stop_at_eos=False)
        what = (f"prefill 32 tokens {res.prefill_s:.2f} s + 3 decode steps {res.decode_s:.2f} s → "
                f"{res.token_ids}")
        self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rows += [("reload in ORT", f"session {load_s:.1f} s; {what}; this process's peak RSS "
                                   f"{self_peak / GB:.2f} GB")]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    text = "# > 2 GB export through external data\n\n" + \
        f"`.venv/bin/python -m bench.large_model {' '.join(argv or sys.argv[1:])}`\n\n| | |\n|---|---|\n" + \
        "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
