"""SHA-256 of every file `qcompiler export` writes, for a fixed set of exports: every method on the tiny llama and OPT
configs (plus fp16, accuracy level 4, w4a8, --ln-matrix, no fallback / contrib ops) and, with --real, SmolLM2-135M
RTN. Used to show that a refactor leaves exports byte-identical (issue 24):

    .venv/bin/python -m scripts.export_hashes -o bench/results/export-hashes-BEFORE.json [--real]
    .venv/bin/python -m scripts.export_hashes -o /tmp/after.json --compare bench/results/export-hashes-BEFORE.json \
        [--skip-library]    # when the op library was rebuilt from changed C++ sources

quant_config.json is compared without its `source` and `calibration.path` (temporary folders) and the per-layer
solver times (`seconds`); tokenizer files are written by transformers and are not hashed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qcompiler.cli import main as qcompiler_main
from tests.helpers import REPO, VOCAB, make_tokenizer, tiny_model

CAL = ["--nsamples", "4", "--seqlen", "32"]
AQ = ["--epochs", "1", *CAL]
CASES = {
    "none": ["--method", "none"],
    "none-fp16": ["--method", "none", "--dtype", "fp16"],
    "rtn": ["--method", "rtn", "--bits", "3", "--group-size", "16"],
    "rtn-fp16": ["--method", "rtn", "--bits", "4", "--group-size", "16", "--dtype", "fp16"],
    "rtn-bare": ["--method", "rtn", "--bits", "3", "--group-size", "16", "--no-fallback", "--no-contrib-ops"],
    "gptq": ["--method", "gptq", "--bits", "3", "--group-size", "16", *CAL],
    "spqr": ["--method", "spqr", "--preset", "sub4", *CAL],
    "spqr-acc4": ["--method", "spqr", *CAL, "--accuracy-level", "4"],
    "affinequant": ["--method", "affinequant", *AQ],
    "affinequant-w4a8": ["--method", "affinequant", *AQ, "--abits", "8"],
    "affinequant-lnmatrix": ["--method", "affinequant", *AQ, "--ln-matrix"],
    "affinequant+spqr": ["--method", "affinequant+spqr", *AQ],
}
HASHED = ("model.onnx", "model.onnx.data", "export_manifest.json", "genai_config.json")


def _without_timings(obj):
    """quant_config.json minus the per-layer solver times (`seconds`), which differ from run to run."""
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def digest(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name in HASHED or p.name.endswith(".so"):
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    cfg = _without_timings(json.loads((folder / "quant_config.json").read_text()))
    cfg.pop("source", None)
    if "calibration" in cfg:
        cfg["calibration"].pop("path", None)
    out["quant_config.json"] = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
    return out


def run(args: list[str]) -> None:
    if qcompiler_main(args) != 0:
        raise SystemExit(f"export failed: {' '.join(args)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", required=True, help="JSON file of hashes to write")
    ap.add_argument("--real", action="store_true", help="also SmolLM2-135M RTN (fetches the GGUF into models/)")
    ap.add_argument("--compare", default=None, help="a JSON file of an earlier run: exit 1 on any difference")
    ap.add_argument("--only", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--skip-library", action="store_true",
                    help="leave the copied op library (libqcompiler_ops.so, a build product) out of the comparison")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = {k: v for k, v in CASES.items() if not args.only or k in args.only.split(",")}
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {"commit": rev, "command": " ".join(["python -m scripts.export_hashes", *sys.argv[1:]]), "exports": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = tmp / "text.txt"
        import random

        rng = random.Random(0)
        text.write_text(" ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(3000)))
        for kind in ("llama", "opt"):
            src = tmp / kind
            torch.manual_seed(0)
            tiny_model(kind).save_pretrained(src)
            make_tokenizer().save_pretrained(src)
            for name, flags in cases.items():
                out = tmp / f"{kind}-{name}"
                t = time.perf_counter()
                needs_cal = any(f in flags for f in ("gptq", "spqr", "affinequant", "affinequant+spqr"))
                run(["export", str(src), *flags, *(["--calibration", str(text)] if needs_cal else []),
                     "-o", str(out), "-q"])
                result["exports"][f"{kind}/{name}"] = digest(out)
                print(f"{kind}/{name}: {time.perf_counter() - t:.1f}s", flush=True)
        if args.real:
            gguf = subprocess.run(["bash", "scripts/fetch_smollm2.sh"], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.strip()
            out = tmp / "smollm2-rtn"
            t = time.perf_counter()
            run(["export", str(REPO / gguf), "--method", "rtn", "--bits", "3", "--group-size", "16", "-o", str(out),
                 "-q"])
            result["exports"]["smollm2/rtn"] = digest(out)
            print(f"smollm2/rtn: {time.perf_counter() - t:.1f}s", flush=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())["exports"]
        bad = [(k, f) for k, files in result["exports"].items() for f, h in files.items()
               if before.get(k, {}).get(f) != h and not (args.skip_library and f.endswith(".so"))]
        missing = sorted(set(before) - set(result["exports"])) if not args.only else []
        for k, f in bad:
            print(f"DIFFERS: {k} {f}")
        for k in missing:
            print(f"MISSING: {k}")
        print(f"{len(result['exports'])} exports compared: {'identical' if not bad and not missing else 'DIFFERENT'}")
        return 1 if bad or missing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
