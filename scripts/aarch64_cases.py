"""SpQRMatMul on aarch64, checked under emulation (scripts/aarch64_emulated.sh drives both halves).

    gen FOLDER          (x86 .venv) single-op models covering the portable CPU paths, their X and the NumPy
                        reference of qcompiler.graph.format
    run LIBRARY FOLDER  (aarch64 Python with numpy + onnxruntime only) each model in ONNX Runtime with the aarch64
                        op library, compared with the reference; exit status 1 on any mismatch

Cases: bits 2/3/4 × group sizes 16, 64, 12 (rows fallback), 128 × statistics 3-bit β2 16, fp16, 3-bit β2 8 ×
M 1, 3 (GEMV), 8, 20 (GEMM) × fp32/fp16 X × accuracy_level 0/4 (4 has no int8 kernel on ARM: fp32), all with 3 %
outliers, act-order permutation and bias. Then a tiny random LLaMA (GQA) exported with SpQR 3-bit: its logits on
aarch64 vs the same graph on x86.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

TOLERANCE = {"float32": 1e-4, "float16": 2e-3}  # relative to max |reference|, as tests/test_spqr_matmul_cpu.py


def gen(folder: Path) -> int:
    import numpy as np

    from tests.builders import random_weight
    from tests.builders import single_op_model

    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    grid = itertools.product([2, 3, 4], [(16, 600), (64, 584), (12, 130), (128, 1024)], [(3, 16), (0, 16), (3, 8)],
                             [1, 3, 8, 20], [np.float32, np.float16], [0, 4])
    for bits, (gs, K), (sb, sg), M, dtype, acc in grid:
        if acc == 4 and dtype == np.float16:
            continue
        i = len(cases)
        w = random_weight(N=70, K=K, bits=bits, group_size=gs, stat_bits=sb, stat_group_size=sg, outlier_rate=0.03,
                          permute=True, bias=True, seed=i)
        x = np.random.default_rng(i).normal(size=(M, K)).astype(dtype)
        model = single_op_model(w, x_dtype=dtype, x_shape=["m", None], accuracy_level=acc)
        (folder / f"case{i}.onnx").write_bytes(model.SerializeToString())
        np.save(folder / f"case{i}_x.npy", x)
        np.save(folder / f"case{i}_ref.npy", w.matmul(x))
        cases.append(dict(i=i, bits=bits, group_size=gs, K=K, stat_bits=sb, stat_group_size=sg, M=M,
                          dtype=np.dtype(dtype).name, accuracy_level=acc))
    (folder / "cases.json").write_text(json.dumps(cases))
    _gen_model(folder / "tiny-llama")
    print(f"{len(cases)} cases and a tiny LLaMA SpQR export in {folder}")
    return 0


def _feeds(model_path: Path, vocab: int) -> dict:
    """Inputs of an exported decoder graph: batch 1, 5 new tokens after 3 cached ones (ONNX Runtime's
    GroupQueryAttention takes several new tokens after a past only at batch 1)."""
    import numpy as np
    import onnx

    dims = {"batch": 1, "sequence_length": 5, "past_sequence_length": 3, "total_sequence_length": 8}
    rng = np.random.default_rng(0)
    feeds = {}
    for v in onnx.load(str(model_path), load_external_data=False).graph.input:
        shape = [dims.get(d.dim_param, d.dim_value) for d in v.type.tensor_type.shape.dim]
        if v.name == "input_ids":
            feeds[v.name] = rng.integers(3, vocab, size=shape).astype(np.int64)
        elif v.name == "attention_mask":
            feeds[v.name] = np.ones(shape, np.int64)
        elif v.name == "position_ids":
            feeds[v.name] = np.broadcast_to(np.arange(3, 8), shape).astype(np.int64).copy()
        else:  # past key/value
            feeds[v.name] = rng.normal(size=shape).astype(np.float32)
    return feeds


def _gen_model(out: Path) -> None:
    """A tiny random LLaMA (GQA) exported with SpQR 3-bit (outliers, act-order) and its logits in x86 ORT."""
    import random

    import numpy as np

    from tests.helpers import VOCAB, make_tokenizer, tiny_model

    from qcompiler.cli import main
    from qcompiler.runtime.ops import session

    src = out.parent / "tiny-llama-src"
    tiny_model("llama").save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    rng = random.Random(0)
    text = out.parent / "calibration.txt"
    text.write_text(" ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(3000)))
    # fp32 activations (3-bit SpQR defaults to int8 ones, which ARM runs in fp32: the logits would differ by design)
    code = main(["export", str(src), "--method", "spqr", "--bits", "3", "--group-size", "16", "--outlier-threshold",
                 "0.2", "--accuracy-level", "0", "--calibration", str(text), "--nsamples", "8", "--seqlen", "64", "-o",
                 str(out), "--force", "-q"])
    if code != 0:
        raise SystemExit("tiny export failed")
    feeds = _feeds(out / "model.onnx", VOCAB)
    np.savez(out.parent / "tiny-feeds.npz", **feeds)
    np.save(out.parent / "tiny-logits.npy", session(str(out / "model.onnx")).run(["logits"], feeds)[0])


def run(library: str, folder: Path) -> int:
    import platform

    import numpy as np
    import onnxruntime as ort

    cases = json.loads((folder / "cases.json").read_text())
    bad, worst = 0, 0.0
    for c in cases:
        so = ort.SessionOptions()
        so.register_custom_ops_library(library)
        sess = ort.InferenceSession(str(folder / f"case{c['i']}.onnx"), so, providers=["CPUExecutionProvider"])
        x = np.load(folder / f"case{c['i']}_x.npy")
        ref = np.load(folder / f"case{c['i']}_ref.npy").astype(np.float32)
        y = sess.run(None, {"X": x})[0].astype(np.float32)
        err = float(np.abs(y - ref).max()) / float(np.abs(ref).max())
        worst = max(worst, err / TOLERANCE[c["dtype"]])
        if not err <= TOLERANCE[c["dtype"]]:
            bad += 1
            print("MISMATCH", c, f"relative error {err:.3g}")
    print(f"{platform.machine()}, ONNX Runtime {ort.__version__}: {len(cases)} cases, {bad} mismatches, "
          f"worst error / tolerance {worst:.3f}")
    # the tiny SpQR export end to end: logits vs the x86 run of the same graph
    so = ort.SessionOptions()
    so.register_custom_ops_library(library)
    sess = ort.InferenceSession(str(folder / "tiny-llama" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    feeds = dict(np.load(folder / "tiny-feeds.npz"))
    ref = np.load(folder / "tiny-logits.npy")
    logits = sess.run(["logits"], feeds)[0]
    diff = float(np.abs(logits - ref).max())
    ok = diff <= 1e-4 * float(np.abs(ref).max())
    print(f"tiny LLaMA SpQR 3-bit export: max |logit diff| aarch64 vs x86 {diff:.2e} (max |logit| "
          f"{float(np.abs(ref).max()):.3g}), greedy next tokens equal: "
          f"{bool((logits.argmax(-1) == ref.argmax(-1)).all())}")
    return 1 if bad or not ok else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "gen":
        sys.exit(gen(Path(sys.argv[2])))
    if len(sys.argv) == 4 and sys.argv[1] == "run":
        sys.exit(run(sys.argv[2], Path(sys.argv[3])))
    sys.exit(__doc__)
