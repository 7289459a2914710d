"""Quality per bit: the perplexity / stored-bits frontier of our exports against llama.cpp, onnxruntime-genai's model
builder and ONNX Runtime's MatMulNBits quantizer, every row measured in one run on identical token windows.

Rows (built into build/peers by `--prepare` where missing; the builds and the perplexity cache are bench/peers.py's):

- ours: `qcompiler export` with `--target-bits` 2.5, 3.0, 3.5, 3.75, 4.0, 4.25, 4.5, 5 and the presets (near-lossless,
  sub4), all with the 8-bit lm_head/embedding table (`--lm-head rtn`: the GGUFs' Q8_0 token_embd counterpart,
  measured lossless) and fp32 activations (`--accuracy-level 0`), calibration 32 × 512 tokens of WikiText-2 validation
  (bench/peers.py's `CALIBRATION`); in ONNX Runtime with the op library. A target row built after another one
  reuses that one's sensitivity probe (`--sensitivity`, same model and calibration; its "export s" then excludes
  the probe, the row says so);
- llama.cpp: `llama-quantize` of the F32 GGUF to every type in `GGUF_TYPES`, each with the importance matrix of
  bench/peers.py (`llama-imatrix` on WikiText-2 validation); perplexity with the GGUF's weights dequantized by
  transformers in PyTorch fp32 (llama.cpp's own `llama-perplexity` where transformers cannot read a type, marked);
- onnxruntime-genai's builder (`-p int4 -e cpu`): `algo_config` rtn / k_quant / k_quant_mixed × block 32 / 128,
  accuracy level 0 (fp32 compute, as every other row); in ONNX Runtime;
- ONNX Runtime's `MatMulNBitsQuantizer` (its default RTN, asymmetric, 4-bit and 8-bit, block 32 / 128) over our
  fp32 export's 210 decoder linears (bench/quality.py's `ort_quantize`); in ONNX Runtime.

Bits per parameter, two columns: the decoder linears only (their stored weights, scales, zero points, outliers,
permutations over their parameters) and all tensors (every stored byte of the file over all parameters of the model,
tied ones once: embeddings, lm_head and norms included — the figure to set beside a GGUF's size).

The verdict lists, for every peer row (bits b, ppl p), our lowest-perplexity row at ≤ b bits and whether its
perplexity is below p, separately for each bits column.

    .venv/bin/python -m bench.pareto --prepare                     # build what is missing, then measure
    .venv/bin/python -m bench.pareto --models ours,IQ4_XS,genai    # a subset of rows (label substrings)

Writes bench/results/pareto-DATE.md, .json and .png (`-o` for another name); the .md/.json after every row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from bench import peers as P

REPO = P.REPO
ROOT = P.PEERS_DIR
TARGETS = (2.5, 3.0, 3.5, 3.75, 4.0, 4.25, 4.5, 5.0)  # the issue's five; 3.75-5: where llama.cpp's files sit
FLAGS_COMMON = [*P.CALIBRATION, "--lm-head", "rtn", "--accuracy-level", "0"]
OURS_POINTS: dict[str, list[str]] = {
    **{f"spqr-target{t:g}": ["--method", "spqr", "--target-bits", f"{t:g}", *FLAGS_COMMON] for t in TARGETS},
    "spqr-near-lossless": ["--method", "spqr", *FLAGS_COMMON],
    "spqr-sub4": ["--method", "spqr", "--preset", "sub4", *FLAGS_COMMON],
}
# every type llama-quantize makes from a float model (its --help list, 1- to 8-bit), with the importance matrix
GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_NL",
              "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K", "Q2_K_S",
              "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
GENAI_POINTS = [{"name": f"genai-{algo}-b{block}", "options": {"algo_config": algo, "block_size": block,
                                                               "accuracy_level": 0},
                 "how": f"onnxruntime-genai builder `-p int4 -e cpu`, algo_config {algo}, block {block}, accuracy level 0"}
                for algo in ("rtn", "k_quant", "k_quant_mixed") for block in (32, 128)]
ORT_POINTS = [{"name": f"ort-w{bits}-b{block}", "options": {"algorithm": "DEFAULT", "bits": bits, "block_size": block,
                                                            "is_symmetric": False, "accuracy_level": None},
               "how": f"ONNX Runtime MatMulNBitsQuantizer (default RTN) {bits}-bit asymmetric, block {block}, on our "
                      "fp32 export's decoder linears"}
              for bits in (4, 8) for block in (32, 128)]
FP32_EXPORT = ["--method", "none"]


def _gguf_type_name(label: str) -> str:
    return label.removeprefix("llama.cpp-")


def all_rows(root: Path) -> list[P.Peer]:
    rows = [P.Peer(f"ours-{name}", "ours", root / "pareto" / name, f"`qcompiler export {' '.join(flags)}`")
            for name, flags in OURS_POINTS.items()]
    rows += [P.Peer(f"llama.cpp-{t}", "llamacpp", P.gguf_path(root, t), f"llama-quantize {t} --imatrix")
             for t in GGUF_TYPES]
    rows += [P.Peer(g["name"], "genai", root / "genai" / g["name"], g["how"]) for g in GENAI_POINTS]
    rows += [P.Peer(o["name"], "genai", root / "pareto" / o["name"], o["how"]) for o in ORT_POINTS]
    return rows


# ------------------------------------------------------------------------------------------------------- builds
class Builder(P.Preparer):
    """bench/peers.py's preparer plus our points and the ORT quantizer rows; `export_seconds` per export."""

    def __init__(self, args: argparse.Namespace, root: Path):
        super().__init__(args, root)
        self.export_seconds: dict[str, float] = {}

    def export(self, name: str, flags: list[str], folder: Path) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        probed = measured_probe(folder.parent) if "--target-bits" in flags else None
        if probed is not None:
            flags = [*flags, "--sensitivity", str(probed)]
        self.export_seconds[name] = P._run(
            f"qcompiler export ({name})", [sys.executable, "-m", "qcompiler.cli", "export", self.args.source, *flags,
                                           "-o", folder, "--force"], log=self.dir / "logs" / f"pareto-{name}.log")

    def ort(self, point: dict, folder: Path) -> None:
        import onnx

        from bench.quality import ort_quantize
        from qcompiler.folder import CONFIG_FILE, MANIFEST_FILE, MODEL_FILE
        from qcompiler.passes.base import save_model

        base = self.dir / "ours" / "fp32"
        if not (base / MODEL_FILE).exists():
            self.export("fp32", FP32_EXPORT, base)
        proto = onnx.load(str(base / MODEL_FILE), load_external_data=True)
        manifest = json.loads((base / MANIFEST_FILE).read_text())
        qproto, _ = ort_quantize(proto, manifest, point["options"], progress=False)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(qproto, str(tmp / MODEL_FILE))
        for f in base.iterdir():  # genai_config.json (the KV layout the perplexity reads), tokenizer files
            if f.is_file() and f.name not in (MODEL_FILE, f"{MODEL_FILE}.data", CONFIG_FILE, MANIFEST_FILE) \
                    and not f.name.endswith(".so"):
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

    def build(self, rows: list[P.Peer]) -> None:
        missing = [r for r in rows if not r.model_file().exists()]
        if not missing:
            return
        if not (self.hf / "model.safetensors").exists() and not self._step("hf folder", self.hf_folder):
            return
        for r in missing:
            name = r.label.removeprefix("ours-")
            if r.kind == "ours":
                P._say(f"prepare: {r.label}")
                self._step(r.label, lambda name=name, r=r: self.export(name, OURS_POINTS[name], r.path))
            elif r.label.startswith("ort-"):
                point = next(o for o in ORT_POINTS if o["name"] == r.label)
                P._say(f"prepare: {r.label}")
                self._step(r.label, lambda point=point, r=r: self.ort(point, r.path))
            elif r.kind == "genai":
                point = next(g for g in GENAI_POINTS if g["name"] == r.label)
                P._say(f"prepare: {r.label}")
                self._step(r.label, lambda point=point: self.genai(point))
        ggufs = [r for r in missing if r.kind == "llamacpp"]
        if not ggufs:
            return
        if not all((P.LLAMACPP_BIN / t).exists() for t in P.LLAMACPP_TARGETS) \
                and not self._step("llama.cpp build", self.llama_cpp):
            return
        if not P.gguf_path(self.dir, "F32").exists() and not self._step("gguf F32", self.gguf_f32):
            return
        if not (self.dir / "gguf" / "imatrix.gguf").exists() and not self._step("imatrix", self.imatrix):
            return
        for r in ggufs:
            q = {"type": _gguf_type_name(r.label), "imatrix": True}
            P._say(f"prepare: {r.label}")
            self._step(r.label, lambda q=q: self.quantize(q))


# ------------------------------------------------------------------------------------------------------- report
def best_below(ours: list[dict], bits: float, key: str) -> Optional[dict]:
    """Our lowest-perplexity row with `key` bits ≤ `bits` (None if none)."""
    fits = [r for r in ours if r.get(key) is not None and r.get("ppl") and r[key] <= bits + 1e-9]
    return min(fits, key=lambda r: r["ppl"]["ppl"]) if fits else None


def verdict(rows: list[dict]) -> list[dict]:
    """Per peer row with a perplexity: for each bits column, our best row at ≤ its bits and whether it wins."""
    ours = [r for r in rows if r["kind"] == "ours" and r.get("ppl")]
    out = []
    for r in rows:
        if r["kind"] == "ours" or not r.get("ppl"):
            continue
        entry = {"label": r["label"], "ppl": r["ppl"]["ppl"]}
        for key in ("bits_linears", "bits_all"):
            if r.get(key) is None:
                continue
            best = best_below(ours, r[key], key)
            entry[key] = {"bits": r[key], "ours": best["label"] if best else None,
                          "ours_ppl": best["ppl"]["ppl"] if best else None,
                          "wins": bool(best and best["ppl"]["ppl"] < r["ppl"]["ppl"])}
        out.append(entry)
    return out


def _f(v: Optional[float], spec: str) -> str:
    return "—" if v is None else format(v, spec)


def render(result: dict) -> str:
    env = result["environment"]
    proto = result.get("protocol") or {}
    rows = sorted(result["rows"], key=lambda r: (r.get("bits_linears") is None, r.get("bits_linears") or 0))
    lines = [f"# Quality per bit: ours vs llama.cpp, onnxruntime-genai and ORT's MatMulNBits quantizer "
             f"({result['date']}, one run)", "",
             f"- command: `{result['command']}`",
             f"- CPU: {env.get('cpu')}; ONNX Runtime {env.get('onnxruntime')}, onnxruntime-genai "
             f"{env.get('onnxruntime_genai')}",
             f"- source model: `{result['source']}`",
             "- ppl: WikiText-2 test, " + (f"{proto['windows']} windows × {proto['seqlen']} tokens (sha256 "
                                           f"{proto['windows_sha256'][:12]}), identical for every row" if proto else "—"),
             "- bits/param: stored bits over parameters — `linears`: the decoder linears only; `all`: every stored "
             "tensor over all of the model's parameters (tied once)", "",
             "| row | runtime | bits/param (linears) | bits/param (all) | ppl | export s | built from / how |",
             "|---|---|--:|--:|--:|--:|---|"]
    for r in rows:
        ppl = r.get("ppl") or {}
        runtime = {"ours": "ORT + op library", "genai": "ORT", "llamacpp": "PyTorch fp32"}.get(r["kind"], "")
        if "llama-perplexity" in (ppl.get("protocol") or ""):
            runtime = "llama-perplexity (not comparable)"
        how = r["how"] + (f"; {P.gguf_types_text(r)}" if r["kind"] == "llamacpp" else "")
        if r.get("settings"):
            how += "; settings " + ", ".join(f"{k} {v:g} %" for k, v in r["settings"].items())
        if r.get("probe_from"):
            how += f"; probe reused from {Path(r['probe_from']).parent.name} (`--sensitivity`: export s without it)"
        err = r.get("missing") or r.get("ppl_error")
        lines.append(f"| {r['label']} | {runtime} | {_f(r.get('bits_linears'), '.3f')} | {_f(r.get('bits_all'), '.3f')}"
                     f" | {_f(ppl.get('ppl'), '.3f')} | {_f(r.get('export_seconds'), '.0f')} | "
                     f"{how}{f' ({err})' if err else ''} |")
    lines += ["", "## Verdict: for each peer row, our best row at no more bits", "",
              "| peer | ppl | bits (linears) | ours at ≤ bits | its ppl | wins | bits (all) | ours at ≤ bits | its ppl | wins |",
              "|---|--:|--:|---|--:|---|--:|---|--:|---|"]
    for v in result.get("verdict", []):
        cells = [v["label"], f"{v['ppl']:.3f}"]
        for key in ("bits_linears", "bits_all"):
            e = v.get(key)
            cells += ([f"{e['bits']:.3f}", e["ours"] or "none", _f(e["ours_ppl"], ".3f"), "yes" if e["wins"] else "**no**"]
                      if e else ["—"] * 4)
        lines.append("| " + " | ".join(cells) + " |")
    wins = [v for v in result.get("verdict", []) if all(v.get(k, {}).get("wins") for k in ("bits_linears", "bits_all"))]
    lines += ["", f"{len(wins)} of {len(result.get('verdict', []))} peer rows beaten on both bits columns."]
    lines += [""] + [f"- {n}" for n in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Two panels (bits of the decoder linears; of all tensors) of ppl against bits, one marker per runtime family,
    our rows joined by their frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = {"ours": ("qcompiler (SpQR)", "o", "tab:red"), "llamacpp": ("llama.cpp", "s", "tab:blue"),
                "genai": ("onnxruntime-genai builder", "^", "tab:green"), "ort": ("ORT MatMulNBits", "v", "tab:gray")}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, key, title in zip(axes, ("bits_linears", "bits_all"), ("decoder linears", "all tensors")):
        for fam, (name, marker, color) in families.items():
            pts = [(r[key], r["ppl"]["ppl"], r["label"]) for r in result["rows"]
                   if r.get("ppl") and r.get(key) is not None
                   and (fam == ("ort" if r["label"].startswith("ort-") else r["kind"]))]
            if not pts:
                continue
            pts.sort()
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=name, zorder=3)
            if fam == "ours":
                front, best = [], float("inf")
                for b, p, _ in pts:
                    if p < best:
                        front.append((b, p))
                        best = p
                ax.plot([b for b, _ in front], [p for _, p in front], color=color, zorder=2)
            for b, p, label in pts:
                ax.annotate(label.removeprefix("ours-").removeprefix("llama.cpp-"), (b, p), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel(f"stored bits per parameter ({title})")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title)
    axes[0].set_ylabel("WikiText-2 perplexity (log scale)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Quality per bit, {Path(result['source']).name} ({result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- run
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.pareto", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="only rows whose label contains one of these comma-separated tokens")
    p.add_argument("--prepare", action="store_true", help="build the missing rows first")
    p.add_argument("--ppl-windows", type=int, default=40, help="perplexity windows (default: 40)")
    p.add_argument("--seqlen", type=int, default=512, help="perplexity window length (default: 512)")
    p.add_argument("--source", type=Path, default=P.DEFAULT_SOURCE, help="the model every row is built from")
    p.add_argument("--peers-dir", type=Path, default=ROOT, help="builds and caches (default: build/peers)")
    p.add_argument("--imatrix-chunks", type=int, default=32, help="512-token chunks for llama-imatrix (default: 32)")
    p.add_argument("-o", "--output", default=None, help="report (default: bench/results/pareto-DATE.md)")
    return p


class Run(P.Run):
    """bench/peers.py's run (sizes, bits, cached perplexities) with this table and the plot."""

    def render(self) -> str:
        self.result["verdict"] = verdict(self.result["rows"])
        return render(self.result)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.calibration = P._data_file("wikitext2/valid.tokens.txt")
    args.threads, args.rounds, args.prompt_tokens, args.new_tokens = [1], 0, 0, 0
    args.skip_speed = True
    try:
        rows = P.select(all_rows(args.peers_dir), args.models)
    except P.BenchError as e:
        print(f"bench/pareto.py: error: {e}", file=sys.stderr)
        return 2
    args.output = str(args.output or P.default_output(REPO / "bench" / "results", stem="pareto"))
    run = Run(args, rows, argv)
    run.result["command"] = ".venv/bin/python -m bench.pareto " + " ".join(argv)
    if args.prepare:
        builder = Builder(args, args.peers_dir)
        P.prepare(run, builder, lambda b: b.build(rows))
        for r in run.result["rows"]:
            name = r["label"].removeprefix("ours-")
            if name in builder.export_seconds:
                r["export_seconds"] = builder.export_seconds[name]
    for r in run.result["rows"]:  # an export made by an earlier run: its time from its own log
        if r["kind"] == "ours" and "export_seconds" not in r:
            r["export_seconds"] = export_seconds_from_log(args.peers_dir / "logs" / f"pareto-{r['label'][5:]}.log")
    present = run.describe()
    for r in run.result["rows"]:
        if r["kind"] == "ours":
            r.update(allocation_of(Path(r["path"])))
        elif r["kind"] == "llamacpp" and Path(r["path"]).exists() and not has_imatrix(Path(r["path"])):
            # a file bench/peers.py made without the importance matrix (its Q4_K_M, Q8_0, Q4_0 rows)
            r["how"] = r["how"].replace(" --imatrix", " without an importance matrix (bench/peers.py's file)")
    run.write()
    run.quality(present)
    run.write()
    plot(run.result, run.out.with_suffix(".png"))
    print(render(run.result))
    P._say(f"wrote {run.out}, {run.out.with_suffix('.json').name}, {run.out.with_suffix('.png').name}")
    return 0


def has_imatrix(path: Path) -> bool:
    """The GGUF was quantized with an importance matrix (llama-quantize records `quantize.imatrix.*`)."""
    import gguf

    return any(key.startswith("quantize.imatrix.") for key in gguf.GGUFReader(str(path)).fields)


def allocation_of(folder: Path) -> dict[str, Any]:
    """A `--target-bits` export's settings: `settings` (share of the decoder-linear parameters per setting, %) and
    `by_projection` (per linear name, e.g. v_proj, how many layers took each setting), from its quant_config.json;
    {} for other exports."""
    record = P._read_json(folder / "quant_config.json") or {}
    allocation = record.get("allocation")
    if not isinstance(allocation, dict):
        return {}
    params = sum(v["params"] for v in allocation["settings"].values()) or 1
    shares = {name: round(100 * v["params"] / params, 1) for name, v in
              sorted(allocation["settings"].items(), key=lambda kv: -kv[1]["params"])}
    by_projection: dict[str, dict[str, int]] = {}
    for path, layer in sorted((record.get("layers") or {}).items()):
        if "setting" in layer:
            counts = by_projection.setdefault(path.rsplit(".", 1)[-1], {})
            counts[layer["setting"]] = counts.get(layer["setting"], 0) + 1
    return {"settings": shares, "by_projection": by_projection, "probe_seconds": allocation.get("probe_seconds"),
            "probe_from": allocation.get("probe_from")}


def measured_probe(root: Path) -> Optional[Path]:
    """A target row's folder under `root` whose export measured its sensitivity probe (not reused), if any."""
    for t in TARGETS:
        folder = root / f"spqr-target{t:g}"
        allocation = (P._read_json(folder / "quant_config.json") or {}).get("allocation") or {}
        if allocation.get("probe") and not allocation.get("probe_from"):
            return folder
    return None


def export_seconds_from_log(log: Path) -> Optional[float]:
    """The total of the `time: load …s, quantize …s, …` line `qcompiler export` prints last (None without a log)."""
    import re

    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    found = re.findall(r"^time: (.*)$", text, flags=re.M)
    if not found:
        return None
    return sum(float(s) for s in re.findall(r"([0-9.]+)s", found[-1]))


if __name__ == "__main__":
    sys.exit(main())
