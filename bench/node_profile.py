"""Where a decode step's time goes: ONNX Runtime's per-node kernel times of one-token steps, per op type and per
linear, for exported folders (ours, or onnxruntime-genai's: anything with a genai_config.json), at each thread count.

Each (folder, threads) runs in a fresh subprocess (several sessions' intra-op pools in one process would compete for
the cores): a `--prompt`-token prompt, then `--steps` one-token steps over one shared KV buffer per key/value
(IOBinding, as `qcompiler generate` and onnxruntime-genai decode), with ORT's profiler on; only the one-token steps'
node events count. The folders and thread counts alternate `--rounds` times and the per-node times are pooled (the
machine's speed drifts). The profiler adds a little to every node, so read the times as shares and ratios between
columns of one run, not as decode speed (bench/peers.py measures that).

    .venv/bin/python -m bench.node_profile build/peers/ours/spqr-w4-head4-a4 build/peers/genai/genai-int4-acc4
    .venv/bin/python -m bench.node_profile OUT --threads 1 2 --steps 100 --rounds 3 -o bench/results/node-profile.md

Tables: per op type, ms per step and nodes per step; per linear (layer indices folded: `model.layers.N.` → `L.`),
µs per call — at each thread count side by side, with the speed-up from the first thread count to the last.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
LINEAR_OPS = ("SpQRMatMul", "MatMulNBits", "MatMul", "Gemm")


def _kv_shape(folder: Path) -> tuple[int, int, int]:
    """(layers, kv heads, head size) from the folder's genai_config.json."""
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    return int(cfg["num_hidden_layers"]), int(cfg["num_key_value_heads"]), int(cfg["head_size"])


def profile_one(folder: Path, threads: int, prompt: int, steps: int) -> dict[str, Any]:
    """Kernel time per node name (µs summed over the one-token steps) and its op type, in this process."""
    import numpy as np
    import onnxruntime as ort

    from qcompiler.runtime.ops import session

    layers, heads, head_size = _kv_shape(folder)
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        sess = session(str(folder / "model.onnx"), sess_options=so)
        names = {i.name for i in sess.get_inputs()}
        binding = sess.io_binding()
        buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, prompt + steps, head_size), np.float32))
                   for _ in range(2 * layers)]
        kv = [f"{i}.{t}" for i in range(layers) for t in ("key", "value")]
        for name, buf in zip(kv, buffers):
            binding.bind_ortvalue_input(f"past_key_values.{name}", buf)
        binding.bind_output("logits", "cpu")  # first: rebound before every run (the prompt's logits are longer)
        for name, buf in zip(kv, buffers):
            binding.bind_ortvalue_output(f"present.{name}", buf)

        def run(ids: np.ndarray, past: int) -> None:
            n = ids.shape[1]
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", np.ones((1, past + n), np.int64))
            if "position_ids" in names:
                binding.bind_cpu_input("position_ids", np.arange(past, past + n, dtype=np.int64)[None])
            binding.bind_output("logits", "cpu")
            sess.run_with_iobinding(binding)

        run(np.arange(3, 3 + prompt, dtype=np.int64)[None] % 100 + 3, 0)
        for i in range(steps):
            run(np.array([[5 + i % 50]], np.int64), prompt + i)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) < 2:
        raise RuntimeError(f"{folder}: the profile has {len(runs)} model runs (expected {steps + 1})")
    prefill_end = runs[0]["ts"] + runs[0]["dur"]
    times: dict[str, float] = collections.defaultdict(float)
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= prefill_end:
            node = e["name"][: -len("_kernel_time")]
            times[node] += e["dur"]
            ops[node] = e["args"]["op_name"]
    return {"folder": str(folder), "threads": threads, "steps": steps, "times_us": dict(times), "ops": ops}


def linear_key(node: str) -> str:
    """A linear's node name with its layer index folded (`model.layers.3.mlp...` → `L.mlp...`)."""
    return re.sub(r"^/?model[./]layers[._]\d+[./]", "L.", node)


def summarize(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pooled over rounds: per op type ms/step and nodes/step; per linear key µs per call."""
    steps = sum(s["steps"] for s in samples)
    by_op: dict[str, float] = collections.defaultdict(float)
    nodes: dict[str, set] = collections.defaultdict(set)
    linear: dict[str, list[float]] = collections.defaultdict(list)
    for s in samples:
        for node, us in s["times_us"].items():
            op = s["ops"][node]
            by_op[op] += us
            nodes[op].add(node)
            if op in LINEAR_OPS:
                linear[linear_key(node)].append(us / s["steps"])
    return {"ms_per_step": {op: t / steps / 1e3 for op, t in by_op.items()},
            "nodes_per_step": {op: len(v) for op, v in nodes.items()},
            "linear_us": {k: statistics.fmean(v) for k, v in linear.items()},
            "total_ms": sum(by_op.values()) / steps / 1e3}


def render(result: dict[str, Any]) -> str:
    threads = result["threads"]
    lines = [f"# Decode-step node profile ({result['date']})", "",
             f"- command: `{result['command']}`",
             f"- {result['prompt']}-token prompt, then {result['steps']} one-token steps × {result['rounds']} rounds "
             "per (folder, threads), each in a fresh process; ONNX Runtime's profiler (kernel times of the one-token "
             "steps only); CPU EP", ""]
    for folder, per_t in result["folders"].items():
        lines += [f"## {folder}", "", "| op type | nodes/step | " + " | ".join(f"ms/step t{t}" for t in threads)
                  + (f" | t{threads[0]} / t{threads[-1]}" if len(threads) > 1 else "") + " |",
                  "|---|--:|" + "--:|" * (len(threads) + (len(threads) > 1))]
        first, last = per_t[str(threads[0])], per_t[str(threads[-1])]
        ops = sorted(first["ms_per_step"], key=lambda o: -first["ms_per_step"][o])
        for op in ops + ["total"]:
            vals = [per_t[str(t)]["total_ms"] if op == "total" else per_t[str(t)]["ms_per_step"].get(op, 0.0)
                    for t in threads]
            count = "" if op == "total" else str(first["nodes_per_step"].get(op, 0))
            ratio = f" | {vals[0] / vals[-1]:.2f}×" if len(threads) > 1 and vals[-1] else (" | —" if len(threads) > 1 else "")
            lines.append(f"| {op} | {count} | " + " | ".join(f"{v:.3f}" for v in vals) + ratio + " |")
        lines += ["", "| linear | " + " | ".join(f"µs/call t{t}" for t in threads)
                  + (f" | t{threads[0]} / t{threads[-1]}" if len(threads) > 1 else "") + " |",
                  "|---|" + "--:|" * (len(threads) + (len(threads) > 1))]
        for key in sorted(first["linear_us"], key=lambda k: -first["linear_us"][k]):
            vals = [per_t[str(t)]["linear_us"].get(key, 0.0) for t in threads]
            ratio = f" | {vals[0] / vals[-1]:.2f}×" if len(threads) > 1 and vals[-1] else (" | —" if len(threads) > 1 else "")
            lines.append(f"| `{key}` | " + " | ".join(f"{v:.1f}" for v in vals) + ratio + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.node_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="exported folders (model.onnx + genai_config.json)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts (default: 1 2)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens before the steps (default: 64)")
    p.add_argument("--steps", type=int, default=64, help="one-token steps per run (default: 64)")
    p.add_argument("--rounds", type=int, default=3, help="runs per (folder, threads), alternated (default: 3)")
    p.add_argument("-o", "--output", default=None,
                   help="markdown report (default: bench/results/node-profile-DATE.md; .json beside)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one profile, JSON to stdout
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(profile_one(Path(args.folders[0]), args.threads[0], args.prompt, args.steps)))
        return 0
    for f in args.folders:
        if not (Path(f) / "model.onnx").is_file() or not (Path(f) / "genai_config.json").is_file():
            print(f"bench/node_profile.py: error: {f} has no model.onnx and genai_config.json", file=sys.stderr)
            return 2
    samples: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    for r in range(args.rounds):
        for t in args.threads:
            for f in args.folders:
                cmd = [sys.executable, "-m", "bench.node_profile", "--one", f, "--threads", str(t),
                       "--prompt", str(args.prompt), "--steps", str(args.steps)]
                out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"bench/node_profile.py: error: {f} t{t}: {out.stderr.strip().splitlines()[-1:]}",
                          file=sys.stderr)
                    return 1
                samples[f, t].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1}/{args.rounds} t{t} {f}", file=sys.stderr, flush=True)
    result = {"date": datetime.date.today().isoformat(),
              "command": " ".join(["python -m bench.node_profile", *(argv if argv is not None else sys.argv[1:])]),
              "threads": list(args.threads), "prompt": args.prompt, "steps": args.steps, "rounds": args.rounds,
              "folders": {f: {str(t): summarize(samples[f, t]) for t in args.threads} for f in args.folders}}
    text = render(result)
    out = Path(args.output) if args.output else REPO / "bench" / "results" / f"node-profile-{result['date']}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
