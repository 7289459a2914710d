"""A > 2 GB export end to end: synthetic wide LLaMA config with random weights → `qcompiler export` → ONNX Runtime.

ONNX protobufs stop at 2 GiB, so a model this size only works if every stage keeps its tensors as external data:
the export, the passes, the emitted `model.onnx` + `model.onnx.data`, the validation session and a reload. The
default config has a 300k vocabulary with untied embeddings (2 × 307M fp32 parameters that stay fp32 after
quantization, so the emitted data file itself is > 2 GB) and two decoder layers (quantized).

The source is written as safetensors shards, one tensor at a time (an 8B-shaped source never sits in memory).
Prints (and writes to bench/results/large-model-<date>.md): parameters, source size, export wall time and peak RSS
(the child process's high-water mark; with `--memory-cap`, also the cgroup's), the export's own per-stage time and
peak memory, emitted sizes, its ORT-vs-PyTorch logit check, and a reload + prefill + decode in a fresh ONNX Runtime
session with the op library (a second child, under the same cap).

    .venv/bin/python -m bench.large_model [--vocab 256000 --hidden 1024 --layers 2] [--method rtn] [--keep DIR]
    # issue 28's acceptance: Llama-3-8B shapes, bfloat16 shards, an 8 GiB cgroup (root), weights offloaded
    .venv/bin/python -m bench.large_model --vocab 128256 --hidden 4096 --intermediate 14336 --layers 32 \\
        --heads 32 --kv-heads 8 --source-dtype bfloat16 --memory-cap 8 \\
        --flags "--bits 4 --group-size 128 --offload-weights --no-memory-check"
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]

GB = 1e9


def make_source(folder: Path, *, vocab: int, hidden: int, layers: int, intermediate: int, seed: int,
                heads: Optional[int] = None, kv_heads: Optional[int] = None, dtype: str = "float32",
                shard_gb: float = 2.0) -> int:
    """Save a random-weight LLaMA (untied embeddings) as safetensors shards of at most `shard_gb` GB with an index
    (transformers' layout), and a word-level tokenizer of `vocab` words, to `folder`. The model is built on the meta
    device (names and shapes only) and each tensor is drawn and written on its own, so an 8B-shaped source never sits
    in memory: this process holds one shard at most. Linears and embeddings N(0, 0.02²) (transformers' LLaMA init),
    norms ones. `heads` / `kv_heads`: default hidden/64 and hidden/256. Returns the parameter count."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads or max(1, hidden // 64),
                         num_key_value_heads=kv_heads or max(1, hidden // 256), max_position_embeddings=512,
                         tie_word_embeddings=False, dtype=dtype)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    limit = int(shard_gb * GB)
    shards: list[dict[str, "torch.Tensor"]] = [{}]
    size = 0

    def flush() -> None:
        index = len(shards)
        save_file(shards[-1], str(folder / f"model-{index:05d}.safetensors"), metadata={"format": "pt"})
        shards[-1] = {k: None for k in shards[-1]}  # names only: the tensors are on disk
        shards.append({})

    for name, shape in shapes.items():
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen).mul_(0.02)
        t = t.to(torch_dtype)
        if shards[-1] and size + t.numel() * t.element_size() > limit:
            flush()
            size = 0
        shards[-1][name] = t
        size += t.numel() * t.element_size()
        del t
    flush()
    shards.pop()
    total = len(shards)
    weight_map = {}
    for i, names in enumerate(shards, 1):
        src = folder / f"model-{i:05d}.safetensors"
        dst = folder / f"model-{i:05d}-of-{total:05d}.safetensors"
        src.rename(dst)
        weight_map.update(dict.fromkeys(names, dst.name))
    nbytes = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": nbytes}, "weight_map": weight_map}, indent=2))
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return sum(math.prod(s) for s in shapes.values())


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


class MemoryCap:
    """A child memory cgroup of this process's own with a hard limit, for the commands `run` starts in it (cgroup v1
    `memory.limit_in_bytes`, or v2 `memory.max`). Page cache counts against the limit and is reclaimed under it, as
    in a container; anonymous memory beyond it gets the process OOM-killed. Needs write access to the cgroup tree
    (root in a VM or a privileged container): otherwise a one-line SystemExit."""

    def __init__(self, limit_bytes: int):
        self.limit = int(limit_bytes)
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            own[controllers] = path
        v1 = Path("/sys/fs/cgroup/memory")
        name = f"qcompiler-bench-{os.getpid()}"
        if "memory" in own and v1.is_dir():
            self.path = v1 / own["memory"].lstrip("/") / name
            self._limit_file, self._peak_file = "memory.limit_in_bytes", "memory.max_usage_in_bytes"
        else:
            self.path = Path("/sys/fs/cgroup") / own.get("", "/").lstrip("/") / name
            self._limit_file, self._peak_file = "memory.max", "memory.peak"
        try:
            self.path.mkdir()
            (self.path / self._limit_file).write_text(str(self.limit))
            if self._limit_file == "memory.limit_in_bytes" and (self.path / "memory.memsw.limit_in_bytes").exists():
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(self.limit))  # no swap past the cap
        except OSError as e:
            self.close()
            raise SystemExit(f"--memory-cap: cannot create a memory cgroup at {self.path} ({e.strerror}); run as "
                             f"root on a machine with a writable cgroup tree, or without --memory-cap") from None

    def enter(self) -> None:
        """In the child, before exec: move this process into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> Optional[int]:
        """The cgroup's memory high-water mark (anonymous + page cache), bytes."""
        try:
            return int((self.path / self._peak_file).read_text())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def run_child(cmd: list[str], log: Path, cap: Optional[MemoryCap]) -> dict:
    """`cmd` in a child process (in `cap`'s cgroup when given), its output to `log`: exit code, wall seconds, the
    child's peak RSS (`os.wait4`) and the cgroup's high-water mark."""
    t = time.perf_counter()
    with open(log, "w") as f:
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                 preexec_fn=cap.enter if cap else None)
        _, status, usage = os.wait4(child.pid, 0)
    return {"code": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - t,
            "peak_rss": usage.ru_maxrss * 1024, "cgroup_peak": cap.peak() if cap else None}


def stage_lines(text: str) -> dict[str, dict[str, float]]:
    """The export's per-stage summary lines (`StageClock.stop`) → stage → {"seconds", "peak_rss_gb", "anon_gb"}."""
    import re

    stages: dict[str, dict[str, float]] = {}
    keys = {"time:": "seconds", "peak memory": "peak_rss_gb", "peak anonymous memory": "anon_gb"}
    for line in text.splitlines():
        key = next((k for prefix, k in keys.items() if line.startswith(prefix)), None)
        if key is None:
            continue
        for item in line.rpartition(": ")[2].split(","):
            m = re.fullmatch(r"(.+?) ([0-9.]+) ?(?:s|GB)", item.strip())
            if m:
                stages.setdefault(m.group(1), {})[key] = float(m.group(2))
    return stages


def reload_and_generate(folder: str) -> None:
    """The `--reload` child: a fresh ONNX Runtime session of `folder` with the op library, a 32-token prefill and
    three decode steps; prints one JSON line."""
    from qcompiler.runtime.generate import Generator

    t = time.perf_counter()
    gen = Generator(Path(folder))
    load_s = time.perf_counter() - t
    res = gen.generate(list(range(3, 35)), max_new_tokens=4, stop_at_eos=False)
    print(json.dumps({"session_s": load_s, "prefill_s": res.prefill_s, "decode_s": res.decode_s,
                      "tokens": res.token_ids}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.large_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=300000)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: hidden / 64)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: hidden / 256)")
    p.add_argument("--source-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the synthetic checkpoint (Llama 3 ships bfloat16)")
    p.add_argument("--shard-gb", type=float, default=2.0, help="safetensors shard size (default: 2 GB)")
    p.add_argument("--method", default="rtn", help="qcompiler export method (default: rtn)")
    p.add_argument("--flags", default="--bits 4 --group-size 128", help="extra export flags")
    p.add_argument("--memory-cap", type=float, default=None, metavar="GIB",
                   help="run the export and the reload in a memory cgroup capped at GIB GiB (needs root)")
    p.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    p.add_argument("--reload", default=None, help=argparse.SUPPRESS)  # the reload child
    p.add_argument("-o", "--output", default=None, help="markdown file (default: bench/results/large-model-<date>.md)")
    args = p.parse_args(argv)
    if args.reload:
        reload_and_generate(args.reload)
        return 0
    out_md = Path(args.output or REPO / "bench" / "results" / f"large-model-{datetime.date.today().isoformat()}.md")

    cap = MemoryCap(int(args.memory_cap * 2**30)) if args.memory_cap else None
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qcompiler-large-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []
    stages: dict[str, dict[str, float]] = {}
    try:
        src, out = work / "src", work / "out"
        t = time.perf_counter()
        reused = (src / "config.json").exists()
        if not reused:
            params = make_source(src, vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                                 intermediate=args.intermediate, seed=0, heads=args.heads, kv_heads=args.kv_heads,
                                 dtype=args.source_dtype, shard_gb=args.shard_gb)
        else:
            from transformers import AutoConfig

            from qcompiler.models.preflight import count_parameters

            params = count_parameters(AutoConfig.from_pretrained(src))
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(src)
        shards = len(list(src.glob("*.safetensors")))
        rows += [("config", f"LLaMA vocab {hf.vocab_size}, hidden {hf.hidden_size}, MLP {hf.intermediate_size}, "
                            f"{hf.num_hidden_layers} layers, {hf.num_attention_heads}/{hf.num_key_value_heads} heads, "
                            "untied embeddings"),
                 ("parameters", f"{params / 1e6:.0f}M ({params * 4 / GB:.2f} GB fp32)"),
                 ("source folder", f"{_size(src) / GB:.2f} GB, {str(hf.dtype or 'float32').removeprefix('torch.')} "
                                   f"in {shards} safetensors shard(s) ("
                                   + ("reused from --keep" if reused else f"written in {time.perf_counter() - t:.0f} s")
                                   + ")")]
        if cap:
            rows.append(("memory cap", f"{args.memory_cap:g} GiB ({cap.limit / GB:.2f} GB): a memory cgroup around the "
                                       "export and the reload (page cache counts and is reclaimed under it)"))
        print("\n".join(f"{k}: {v}" for k, v in rows), flush=True)

        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "qcompiler.cli", "export", str(src), "--method", args.method,
               *args.flags.split(), "-o", str(out)]
        log = work / "export.log"
        run = run_child(cmd, log, cap)
        text = log.read_text()
        if run["code"] != 0:
            print(text[-4000:], file=sys.stderr)
            why = " (killed: the memory cap)" if run["code"] == -9 and cap else ""
            raise SystemExit(f"export failed (exit {run['code']}){why}; log {log}")
        stages = stage_lines(text)
        cfg = json.loads((out / "quant_config.json").read_text())
        val = cfg["validation"]
        data = _size(out / "model.onnx.data")
        capped = f", cgroup peak {run['cgroup_peak'] / GB:.2f} GB" if run["cgroup_peak"] else ""
        rows += [("export", f"`{' '.join(cmd[2:4])} ... --method {args.method} {args.flags}`: {run['seconds']:.0f} s, "
                            f"peak RSS {run['peak_rss'] / GB:.2f} GB{capped} (estimate before loading: "
                            f"{cfg['memory_estimate_gib'] * 2**30 / GB:.2f} GB)"),
                 ("emitted", f"model.onnx {_size(out / 'model.onnx') / 1e6:.2f} MB + model.onnx.data "
                             f"{data / GB:.2f} GB ({data / 2**31:.2f} × 2 GiB); {cfg['n_quantized_layers']} quantized "
                             f"linears, {cfg['avg_bits']:.3f} bits/param"),
                 ("validation (in the export)", f"max \\|logit diff\\| ORT vs PyTorch {val['max_abs_logit_diff']:.3g} "
                                                f"(limit {val['limit']:.3g})")]

        log = work / "reload.log"
        run = run_child([sys.executable, "-m", "bench.large_model", "--reload", str(out)], log, cap)
        text = log.read_text()
        if run["code"] != 0:
            print(text[-4000:], file=sys.stderr)
            raise SystemExit(f"reload failed (exit {run['code']}); log {log}")
        res = json.loads(text.strip().splitlines()[-1])
        capped = f", cgroup peak {run['cgroup_peak'] / GB:.2f} GB" if run["cgroup_peak"] else ""
        rows += [("reload in ORT", f"session {res['session_s']:.1f} s; prefill 32 tokens {res['prefill_s']:.2f} s + "
                                   f"3 decode steps {res['decode_s']:.2f} s → {res['tokens']}; peak RSS "
                                   f"{run['peak_rss'] / GB:.2f} GB{capped}")]
    finally:
        if cap:
            cap.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    text = "# > 2 GB export through external data\n\n" + \
        f"`.venv/bin/python -m bench.large_model {' '.join(argv or sys.argv[1:])}`\n\n| | |\n|---|---|\n" + \
        "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    if stages:
        anon = any("anon_gb" in v for v in stages.values())
        text += ("\nPer stage (the export's own summary: wall time and the process's peak RSS after the stage"
                 + (", with its peak anonymous memory: the weights are file pages" if anon else "") + "):\n\n"
                 + "| stage | seconds | peak RSS GB |" + (" peak anonymous GB |" if anon else "") + "\n"
                 + "|---|--:|--:|" + ("--:|" if anon else "") + "\n")
        for stage, v in stages.items():
            cells = [f"{v.get('seconds', math.nan):.1f}", f"{v.get('peak_rss_gb', math.nan):.2f}"]
            cells += [f"{v.get('anon_gb', math.nan):.2f}"] if anon else []
            text += f"| {stage} | " + " | ".join(cells) + " |\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
