"""Same-process A/B of two builds of the op library on one exported folder: decode and prefill speed, paired.

On a shared VM whose speed drifts 10–20 % by the hour (and up to 2× within minutes), two fresh processes measured
minutes apart compare the machine's phases more than the builds. Here one process loads the folder twice, each
session with its own copy of the library (ONNX Runtime registers a custom-op library per `SessionOptions`, so two
builds coexist), and alternates them generation by generation: each round runs A then B (then B then A, so neither
always goes first) and the per-round ratio B / A cancels what the machine did in between. Reported: the median and
quartiles of those ratios, for decode (`--new-tokens` greedy tokens after a `--prompt-tokens` prompt) and prefill,
at each `--threads` (each thread count in its own subprocess: two sessions' intra-op pools of several threads in one
process would compete for the cores only while both run, which they never do here, but a fresh process per thread
count keeps the pools' spinning out of the other count's rounds), and whether A and B produced the same tokens.

    .venv/bin/python -m bench.ab build/peers/ours/spqr-w4-head4-a4 --a base=/tmp/base/libqcompiler_ops.so \\
        --b head=qcompiler/_lib/libqcompiler_ops.so --threads 1 2 --seconds 60 -o bench/results/ab-DATE.md

Writes a markdown table and the raw per-round figures (.json beside).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


def paired_summary(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Per-round ratios b / a (rates: > 1 means B is faster): their median and quartiles, and A's and B's medians."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_summary needs two equally long, non-empty lists")
    ratios = sorted(y / x for x, y in zip(a, b))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"a": statistics.median(a), "b": statistics.median(b), "ratio": statistics.median(ratios),
            "q1": q[0], "q3": q[2], "rounds": len(ratios)}


def _parse_lib(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=LIBRARY, got {text!r}")
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{p} is not a file")
    return label, p


def measure(folder: Path, libs: Sequence[Path], threads: int, seconds: float, prompt_tokens: int,
            new_tokens: int) -> dict[str, Any]:
    """In this process: one Generator per library, alternated for `seconds`; per-round decode/prefill tok/s."""
    from qcompiler.runtime import ops
    from qcompiler.runtime.generate import Generator

    gens = []
    for lib in libs:
        os.environ[ops.ENV_VAR] = str(lib)  # read when each session registers the library
        gen = Generator(folder, threads=threads)
        gen.generate(list(range(1000, 1000 + prompt_tokens)), max_new_tokens=4, stop_at_eos=False)
        gens.append(gen)
    ids = list(range(1000, 1000 + prompt_tokens))
    decode: list[list[float]] = [[], []]
    prefill: list[list[float]] = [[], []]
    tokens: list[Optional[list[int]]] = [None, None]
    end, r = time.perf_counter() + seconds, 0
    while time.perf_counter() < end or r < 2:
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            res = gens[k].generate(ids, max_new_tokens=new_tokens, stop_at_eos=False)
            decode[k].append(res.decode_tokens_per_s)
            prefill[k].append(res.prefill_tokens_per_s)
            tokens[k] = list(res.token_ids)
        r += 1
    return {"threads": threads, "decode": decode, "prefill": prefill, "same_tokens": tokens[0] == tokens[1]}


def render(result: dict[str, Any]) -> str:
    a, b = result["a"]["label"], result["b"]["label"]
    lines = [f"# Same-process A/B: {b} vs {a} ({result['date']})", "",
             f"- folder: `{result['folder']}`",
             f"- A `{a}`: `{result['a']['path']}` (sha256 {result['a']['sha256'][:12]})",
             f"- B `{b}`: `{result['b']['path']}` (sha256 {result['b']['sha256'][:12]})",
             f"- CPU: {result['cpu']}; {result['prompt_tokens']}-token prompt, {result['new_tokens']} greedy tokens per "
             f"generation; A and B alternated in one process for {result['seconds']:g} s per thread count",
             f"- command: `{result['command']}`", "",
             f"| threads | decode tok/s A | decode tok/s B | decode B / A, paired (quartiles) | prefill tok/s A | "
             f"prefill tok/s B | prefill B / A, paired | rounds | same tokens |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|:-:|"]
    for row in result["rows"]:
        d, p = row["decode_summary"], row["prefill_summary"]
        lines.append(f"| {row['threads']} | {d['a']:.1f} | {d['b']:.1f} | {d['ratio']:.3f} [{d['q1']:.3f}–{d['q3']:.3f}] "
                     f"| {p['a']:.1f} | {p['b']:.1f} | {p['ratio']:.3f} [{p['q1']:.3f}–{p['q3']:.3f}] | "
                     f"{d['rounds']} | {'yes' if row['same_tokens'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a `qcompiler export` folder")
    p.add_argument("--a", required=True, type=_parse_lib, metavar="LABEL=LIBRARY", help="the reference build")
    p.add_argument("--b", required=True, type=_parse_lib, metavar="LABEL=LIBRARY", help="the build compared with it")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    p.add_argument("--seconds", type=float, default=60.0, help="alternation time per thread count (default: 60)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default: 64)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per generation (default: 64)")
    p.add_argument("-o", "--output", default=None, help="report (default: bench/results/ab-DATE.md; .json beside)")
    p.add_argument("--measure-one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one thread count
    args = p.parse_args(argv)
    libs = [args.a[1], args.b[1]]
    if args.measure_one is not None:
        print(json.dumps(measure(args.folder, libs, args.measure_one, args.seconds, args.prompt_tokens,
                                 args.new_tokens)))
        return 0
    if not (args.folder / "model.onnx").is_file():
        print(f"bench/ab.py: error: {args.folder} has no model.onnx", file=sys.stderr)
        return 2
    date = datetime.date.today().isoformat()
    result: dict[str, Any] = {
        "date": date, "folder": str(args.folder), "cpu": _cpu_name(), "seconds": args.seconds,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "command": "python -m bench.ab " + " ".join(argv),
        "a": {"label": args.a[0], "path": str(args.a[1]), "sha256": hashlib.sha256(args.a[1].read_bytes()).hexdigest()},
        "b": {"label": args.b[0], "path": str(args.b[1]), "sha256": hashlib.sha256(args.b[1].read_bytes()).hexdigest()},
        "rows": []}
    out = Path(args.output) if args.output else REPO / "bench" / "results" / f"ab-{date}.md"
    for threads in args.threads:
        cmd = [sys.executable, "-m", "bench.ab", *argv, "--measure-one", str(threads)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"bench/ab.py: error: threads {threads}: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["decode_summary"] = paired_summary(*row["decode"])
        row["prefill_summary"] = paired_summary(*row["prefill"])
        result["rows"].append(row)
        print(f"[ab] threads {threads}: decode B/A {row['decode_summary']['ratio']:.3f}, prefill B/A "
              f"{row['prefill_summary']['ratio']:.3f} over {row['decode_summary']['rounds']} rounds", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(result))
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
