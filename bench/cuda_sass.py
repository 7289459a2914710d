"""Static cost of the CUDA decode GEMV: instructions per weight in its SASS, where no GPU is to time it.

Compiles the CUDA kernel files (custom_ops/src/cuda/*.cu) with nvcc for one architecture, with the runtime statistics
width and group size pinned to constants (`--stat-bits`, `--group-size`; a copy of the source with `a.stat_bits` /
`a.group_size` replaced), the warp's rows sharing their second-level group (every preset's case) and X resident in
shared memory (the decode default wherever it fits: no staging inside the loop), so the branches not taken drop out
and the straight-line count is the executed one, disassembles it with cuobjdump and counts the instructions of the
slab loop (all of it: the next slab's loads, decode, sums, statistics, loop control) of each
SpQRGemvKernel<T, bits, MT, R>. One slab iteration of one lane covers rows-per-warp × 32 weights, so instructions per
weight = count / (rows × 32).

    python -m bench.cuda_sass                     # sm_90, fp16 X, stats 3-bit, group 16
    python -m bench.cuda_sass --arch sm_87 --group-size 64

Needs nvcc (/usr/local/cuda/bin or PATH) and cuobjdump + nvdisasm (the CUDA toolkit's, or the pip wheels
nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm of the dev extra).
A static count is not a timing: memory stalls and occupancy are not in it; the "cycles ≥" column is the bound from
issue (one instruction per cycle) and the half-rate ALU pipe, whichever is larger.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from tests.cuda_emu import GEMV_ROWS  # rows per warp each decode GEMV tile offers, most first
# the prefill kernel's tiles (PrefillSmall, PrefillLarge in the .cu): rows of X, rows of W, threads
PREFILL_TILES = ((64, 64, 128), (128, 128, 256))


def prefill_kernel(bits: int, tm: int, tn: int) -> str:
    """function_sass pattern of SpQRMatMulPrefillKernel<bits, PrefillTile<tm, tn, ...>>."""
    return f"SpQRMatMulPrefillKernelILi{bits}E*PrefillTileILi{tm}ELi{tn}E"
SRC = REPO / "custom_ops" / "src"


def find_tool(name: str, required: bool = True):
    """Path of a CUDA tool: PATH, /usr/local/cuda/bin, or the pip wheels nvidia-cuda-{cuobjdump,nvdisasm} (dev extra).
    None when absent and not `required`."""
    for cand in (shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if cand and Path(cand).is_file():
            return cand
    try:
        import nvidia

        for base in nvidia.__path__:
            for p in Path(base).rglob(name):
                return str(p)
    except ImportError:
        pass
    if required:
        sys.exit(f"{name} not found (CUDA toolkit, or pip install nvidia-cuda-{name})")
    return None


def disassemble(cubin: Path) -> str:
    """cuobjdump -sass of `cubin` (cuobjdump runs nvdisasm, found the same way)."""
    env = dict(os.environ, NVDISASM_PATH=str(Path(find_tool("nvdisasm")).parent))
    return subprocess.run([find_tool("cuobjdump"), "-sass", str(cubin)], check=True, capture_output=True, text=True,
                          env=env).stdout


def function_sass(sass: str, kernel: str) -> str:
    """The SASS text of the first function whose name contains `kernel` (where "*" stands for any text)."""
    name = r"\S*".join(re.escape(part) for part in kernel.split("*"))  # "*": any mangled text in between
    m = re.search(r"Function : \S*" + name + r"\S*\n(.*?)(?=\n\s*Function :|\Z)", sass, re.S)
    if m is None:
        raise SystemExit(f"no function matching {kernel}")
    return m.group(1)


def _loops(sass: str, kernel: str):
    """(instructions as (address, text), loops as (head, back-branch address)) of the first function matching."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s*(.*?);",
                                                          function_sass(sass, kernel))]
    loops = []
    for a, t in ins:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) <= a:
            loops.append((int(m.group(1), 16), a))
    if not loops:
        raise SystemExit(f"no loop in {kernel}")
    return ins, loops


def _hot(ins, loops, op: str):
    def count(loop):
        return sum(1 for a, t in ins if loop[0] <= a <= loop[1] and op in t)

    return max(loops, key=lambda lp: (count(lp), -(lp[1] - lp[0])))


def hot_loop(sass: str, kernel: str, op: str = "FFMA") -> list[str]:
    """Instructions of the loop (a backward branch and its target) with the most `op` instructions (the innermost of
    equals) in the first function whose name contains `kernel`: the decode GEMV's slab loop (FFMA), the prefill
    kernel's chunk loop (HMMA)."""
    ins, loops = _loops(sass, kernel)
    head, back = _hot(ins, loops, op)
    return [t for a, t in ins if head <= a <= back]


def inner_loop_sizes(sass: str, kernel: str, op: str = "HMMA") -> list[int]:
    """Instruction counts of the loops nested in hot_loop(sass, kernel, op) (each counted once in its static size)."""
    ins, loops = _loops(sass, kernel)
    head, back = _hot(ins, loops, op)
    nested = [(h, b) for h, b in sorted(set(loops)) if head <= h and b <= back and (h, b) != (head, back)]
    return [sum(1 for a, _ in ins if h <= a <= b) for h, b in nested]


# Integer/logic instructions of the 16-lane ALU pipe of an sm_80-90 SM partition: a warp's takes 2 cycles there, where
# the scheduler issues one instruction per cycle (FP32 runs on two 16-lane pipes, so at one warp per cycle). A slab
# loop is bound by at least max(instructions, 2 x ALU) cycles per warp and partition (IMAD, on the FMA-heavy pipe, and
# memory instructions are left out of the ALU count).
ALU_HALF_RATE = {"PRMT", "LOP3", "SHF", "IADD3", "ISETP", "LEA", "SEL", "VIADD", "MOV", "IMNMX", "VIMNMX", "FSEL",
                 "SGXT", "BMSK", "FLO", "POPC"}


# The CUDA files with kernels (each compiled to its own cubin) and the file with the GEMV cost model (kGemvSlabInstr).
KERNEL_SOURCES = ("decode_gemv.cu", "prefill.cu", "generic_rows.cu")
COST_MODEL = SRC / "cuda" / "launcher.cu"


def compile_sass(src: Path, arch: str, out_dir: Path, nvcc: str | None = None) -> tuple[str, str]:
    """ptxas's resource report and the SASS of every kernel file under `src` (a copy of custom_ops/src) for `arch`."""
    report, sass = [], []
    for name in KERNEL_SOURCES:
        cubin = out_dir / (Path(name).stem + ".cubin")
        r = subprocess.run([nvcc or find_tool("nvcc"), "-std=c++17", "-O3", f"-arch={arch}", "-cubin",
                            "--resource-usage", f"-I{src}", str(src / "cuda" / name), "-o", str(cubin)],
                           capture_output=True, text=True, check=True)
        report.append(r.stdout + r.stderr)
        sass.append(disassemble(cubin))
    return "".join(report), "\n".join(sass)


def pinned_sass(arch: str, stat_bits: int, group_size: int) -> str:
    """SASS of the CUDA kernels for `arch`, with the statistics width and group size pinned to constants, the
    warp's rows sharing their second-level group (stat_group_size a multiple of 4, as every preset) and X resident in
    shared memory (M = 1 up to K ~ 24k on H100-class parts); in the prefill kernel an interior chunk (no code quad
    across a group boundary or K's end) and 16-byte-aligned X: the branches not taken drop out of the loops."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(SRC, src)
        files = {p: p.read_text().replace("a.stat_bits", str(stat_bits)).replace("a.group_size", str(group_size))
                 for p in (src / "cuda").glob("*.cu*")}
        for pin, value in (("const bool stats_shared = stat_rows[0].stat_group == stat_rows[R - 1].stat_group;",
                            "const bool stats_shared = true;"),
                           ("const bool resident = mode == kXResident;", "const bool resident = true;"),
                           ("if (mode == kXSlabsRows) {", "if (false) {"),
                           # prefill: an interior chunk (no quad across a group boundary or K's end), X 16-byte aligned
                           ("const bool quad_groups = next % 4 == 0 && !tail;", "const bool quad_groups = true;"),
                           ("const bool x_vec = a.K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;",
                            "const bool x_vec = true;")):
            if sum(text.count(pin) for text in files.values()) != 1:
                raise SystemExit(f"bench/cuda_sass.py: {pin!r} moved; update the pin")
            files = {p: text.replace(pin, value) for p, text in files.items()}
        for p, text in files.items():
            p.write_text(text)
        return compile_sass(src, arch, Path(tmp))[1]


def slab_loop_size(sass: str, x: str, bits: int, mt: int, rows: int) -> int:
    """Instructions of SpQRGemvKernel<x, bits, mt, rows>'s slab loop (x: "half" or "float")."""
    t = "6__half" if x == "half" else "f"
    return len(hot_loop(sass, f"SpQRGemvKernelI{t}Li{bits}ELi{mt}ELi{rows}E"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--stat-bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--x", default="half", choices=["half", "float"], help="X's type")
    args = p.parse_args(argv)
    sass = pinned_sass(args.arch, args.stat_bits, args.group_size)
    t = "6__half" if args.x == "half" else "f"
    print(f"{args.arch}, X {args.x}, stat bits {args.stat_bits}, group size {args.group_size}, X resident: "
          "SpQRGemvKernel slab loop (all of it), per lane")
    print("| bits | rows of X (MT) | rows per warp | instructions | per weight | ALU (half rate) | cycles ≥ | "
          "calls | top instructions |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|---|")
    for bits in (2, 3, 4):
        for mt in (1, 2, 4, 8):
            for rows in GEMV_ROWS[mt]:
                body = hot_loop(sass, f"SpQRGemvKernelI{t}Li{bits}ELi{mt}ELi{rows}E")
                ops = Counter((b.split()[1] if b.startswith("@") else b.split()[0]).split(".")[0] for b in body)
                top = ", ".join(f"{k} {v}" for k, v in ops.most_common(5))
                alu = sum(v for k, v in ops.items() if k in ALU_HALF_RATE)
                print(f"| {bits} | {mt} | {rows} | {len(body)} | {len(body) / (rows * 32):.2f} | {alu} | "
                      f"{max(len(body), 2 * alu)} | {ops.get('CALL', 0)} | {top} |")
    print()
    print(f"{args.arch}: SpQRMatMulPrefillKernel<bits, tile> chunk loop (tile rows of W x 32 columns per block), per "
          "thread; static, nested loops (X staging, outliers) counted once; per weight x row of X: instructions of "
          "all the block's threads per (weight, row of X) of its tile")
    print("| bits | tile (X rows x W rows, threads) | instructions | per weight x row of X | nested loops |")
    print("|--:|---|--:|--:|---|")
    for bits in (2, 3, 4):
        for tm, tn, threads in PREFILL_TILES:
            kernel = prefill_kernel(bits, tm, tn)
            body = hot_loop(sass, kernel, "HMMA")
            print(f"| {bits} | {tm} x {tn}, {threads} | {len(body)} | {len(body) * threads / (tn * 32 * tm):.3f} | "
                  f"{', '.join(map(str, inner_loop_sizes(sass, kernel)))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
