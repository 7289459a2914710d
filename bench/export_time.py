"""Export time of `--target-bits` against the plain SpQR preset, same calibration, same machine, rounds alternated.

Issue 27's limit: an export with `--target-bits` at the references' calibration size (128 windows × 2048 tokens)
takes at most 1.5× the time of the plain preset's. Each round runs every configuration once, as a child
`qcompiler export` into a scratch folder (deleted afterwards); the order alternates round by round, because this
machine's speed drifts over an hour. Per export: wall time, the child's peak RSS (`os.wait4`), and for target-bits
exports the probe's seconds from `quant_config.json` (`allocation.probe_seconds`). The ratio is the median target
time over the median plain time.

    .venv/bin/python -m bench.export_time                                   # 128 × 2048, target 4.5, one round
    .venv/bin/python -m bench.export_time --nsamples 8 --seqlen 256 --rounds 2 -o /tmp/t.md   # a quick look

Writes bench/results/export-time-DATE.md and .json (`-o` for another name).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from bench import peers as P

REPO = P.REPO
LIMIT = 1.5  # the ratio


def configurations(target_bits: float) -> dict[str, list[str]]:
    """Flags per configuration; both keep the lm_head and fp32 activations so only the allocation differs."""
    common = ["--method", "spqr", *P.KEEP, "--accuracy-level", "0"]
    return {"plain": common, f"target{target_bits:g}": [*common, "--target-bits", f"{target_bits:g}"]}


def timed_export(source: str, flags: Sequence[str], out: Path, log: Path) -> dict[str, Any]:
    """One `qcompiler export` in a child process: wall seconds, peak RSS (bytes) and the probe's seconds if any."""
    cmd = [sys.executable, "-m", "qcompiler.cli", "export", source, *flags, "-o", str(out), "--force"]
    tick = time.perf_counter()
    with open(log, "w") as f:
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - tick
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"export failed (exit {code}): {' '.join(cmd)}; log {log}")
    row: dict[str, Any] = {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "command": cmd[2:]}
    config = json.loads((out / "quant_config.json").read_text())
    allocation = config.get("allocation") or {}
    if allocation:
        row["probe_seconds"] = allocation.get("probe_seconds")
        row["realized_bits"] = allocation.get("realized_bits")
    return row


def summarize(runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Median seconds per configuration and the target/plain ratio."""
    medians = {name: statistics.median(r["seconds"] for r in rows) for name, rows in runs.items()}
    plain = medians.get("plain")
    ratios = {name: m / plain for name, m in medians.items() if plain and name != "plain"}
    return {"median_seconds": medians, "ratio_to_plain": ratios,
            "within_limit": all(r <= LIMIT for r in ratios.values()) if ratios else None}


def render(result: dict) -> str:
    s = result["summary"]
    lines = [f"# Export time: --target-bits vs the plain SpQR preset ({result['date']}, "
             f"{result['rounds']} round{'s' if result['rounds'] != 1 else ''})", "",
             f"- command: `{result['command']}`",
             f"- CPU: {result['cpu']}; {result['threads']} threads",
             f"- source model: `{result['source']}`",
             f"- calibration: {result['nsamples']} windows × {result['seqlen']} tokens (WikiText-2 validation), "
             "lm_head kept, fp32 activations; order alternated round by round",
             "", "| configuration | round | export s | probe s (gradients + settings) | peak RSS GB | bits |",
             "|---|--:|--:|--:|--:|--:|"]
    for name, rows in result["runs"].items():
        for i, r in enumerate(rows):
            probe = r.get("probe_seconds") or {}
            probe_s = f"{sum(probe.values()):.0f} ({probe.get('gradients', 0):.0f} + {probe.get('settings', 0):.0f})" \
                if probe else "—"
            bits = f"{r['realized_bits']:.3f}" if r.get("realized_bits") is not None else "—"
            lines.append(f"| {name} | {i + 1} | {r['seconds']:.0f} | {probe_s} | {r['peak_rss'] / 1e9:.2f} | {bits} |")
    lines += ["", "Median export seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s["median_seconds"].items()) + "."]
    for name, ratio in s["ratio_to_plain"].items():
        lines.append(f"{name} / plain: **{ratio:.2f}×** (limit {LIMIT}×: {'met' if ratio <= LIMIT else 'not met'}).")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.export_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=str(P.DEFAULT_SOURCE), help="model to export (default: the real model)")
    p.add_argument("--target-bits", type=float, default=4.5)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("-o", "--output", type=Path, default=None, help="results .md (a .json beside it)")
    p.add_argument("--logs", type=Path, default=REPO / "build" / "export-time", help="export logs folder")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    output = args.output or P.default_output(REPO / "bench" / "results", stem="export-time")
    args.logs.mkdir(parents=True, exist_ok=True)
    calib = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    configs = {name: [*flags, *calib] for name, flags in configurations(args.target_bits).items()}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "rounds": args.rounds,
        "command": "python -m bench.export_time " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": P.environment().get("cpu", platform.processor()), "threads": os.cpu_count(),
        "source": args.source, "nsamples": args.nsamples, "seqlen": args.seqlen, "runs": runs}
    with tempfile.TemporaryDirectory(prefix="export-time-") as scratch:
        for rnd in range(args.rounds):
            names = list(configs) if rnd % 2 == 0 else list(reversed(configs))
            for name in names:
                out = Path(scratch) / name
                print(f"round {rnd + 1}/{args.rounds}: {name} ...", flush=True)
                row = timed_export(args.source, configs[name], out, args.logs / f"{name}-r{rnd + 1}.log")
                runs[name].append(row)
                print(f"  {row['seconds']:.0f} s, peak RSS {row['peak_rss'] / 1e9:.2f} GB", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                result["summary"] = summarize({k: v for k, v in runs.items() if v})
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(render(result))
                output.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
