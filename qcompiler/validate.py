"""Validation of an exported folder: its logits in ONNX Runtime (with the op library) against the PyTorch fake-quant
model the quantizer left behind, within `atol + rtol · max |logit|`.

The check runs on the folder as written. A folder saved with `--accuracy-level 4` (the CPU kernel quantizes
activations to int8) is also checked at level 0, exact fp32 semantics, on an in-memory copy of its graph that reads
the same weight file: the tolerance applies to that exact run, the level-4 difference is recorded next to it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch

from qcompiler import QCompilerError
from qcompiler.folder import MODEL_FILE

DTYPES = ("fp32", "fp16")
# Validation tolerance (atol, rtol) of ORT logits against the PyTorch fp32 fake-quant model: fp32 graphs differ by
# summation order only; fp16 graphs also round activations and unquantized weights to fp16.
DEFAULT_TOLERANCE = {"fp32": (1e-3, 1e-4), "fp16": (5e-2, 1e-2)}
# Learned transforms folded into norms and weights (AffineQuant) spread the norm scales over orders of magnitude,
# which amplifies fp32 summation-order differences: SmolLM2-135M, 20 epochs, showed 5.8e-3 at max |logit| 30.7
# (1.9e-4 relative), above the default 4.1e-3. A decoding bug moves logits by O(1).
TRANSFORM_RTOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """`|logits_ORT − logits_PyTorch| ≤ atol + rtol · max |logit|`."""

    atol: float
    rtol: float

    @classmethod
    def for_export(cls, dtype: str, *, atol: Optional[float], rtol: Optional[float], transforms: bool) -> "Tolerance":
        """The user's values, else the dtype's defaults (rtol at least `TRANSFORM_RTOL` for folded transforms)."""
        if dtype not in DTYPES:
            raise QCompilerError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        default_atol, default_rtol = DEFAULT_TOLERANCE[dtype]
        if rtol is None:
            rtol = max(default_rtol, TRANSFORM_RTOL) if transforms else default_rtol
        return cls(atol=default_atol if atol is None else atol, rtol=rtol)


def random_feeds(model: torch.nn.Module, kv: dict, *, seq: int = 8, past: int = 3, seed: int = 0,
                 dtype: str = "float32") -> dict:
    """Random graph inputs (tokens, a random KV past) for `verify_each`'s before/after runs."""
    from qcompiler.graph.export import KVLayout

    layout = KVLayout(**kv)
    rng = np.random.default_rng(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    feeds = {
        "input_ids": rng.integers(0, vocab, size=(1, seq)).astype(np.int64),
        "attention_mask": np.ones((1, past + seq), np.int64),
        "position_ids": np.arange(past, past + seq, dtype=np.int64)[None],
    }
    for name in layout.input_names():
        feeds[name] = rng.standard_normal((1, layout.num_kv_heads, past, layout.head_dim)).astype(dtype)
    return feeds


def validate_logits(
    folder: Path, model: torch.nn.Module, kv: dict, *, seq: int = 16, seed: int = 0, graph: Optional[bytes] = None
) -> tuple[float, float]:
    """`(max |logits_ORT − logits_PyTorch|, max |logits_PyTorch|)` on a random token sequence (ORT with the op
    library, CPU EP). `graph`: a serialized variant of the folder's model.onnx to run instead (its weights are read
    from the folder's data file).

    Both sides compute in fp32 with different summation orders, so their difference grows with the logits' scale
    and the depth of the model: on SmolLM2-135M GPTQ 3-bit, PyTorch fp32 itself is 1.6e-3 from a float64 run of the
    same model while ONNX Runtime is 6e-4 from it (max |logit| 34). The caller therefore accepts
    `diff ≤ atol + rtol · max |logit|`; a decoding bug moves logits by orders of magnitude more."""
    from qcompiler.graph.export import KVLayout
    from qcompiler.runtime.ops import session

    layout = KVLayout(**kv)
    if graph is None:
        sess = session(str(folder / MODEL_FILE))
    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        sess = session(graph, sess_options=so)
    vocab = sess.get_outputs()[0].shape[-1]
    vocab = vocab if isinstance(vocab, int) else model.get_output_embeddings().weight.shape[0]
    ids = np.random.default_rng(seed).integers(0, vocab, size=(1, seq)).astype(np.int64)
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones((1, seq), np.int64),
        "position_ids": np.arange(seq, dtype=np.int64)[None],
        **layout.empty_past(1, dtype=np.float16 if any(i.type == "tensor(float16)" for i in sess.get_inputs())
                            else np.float32),
    }
    got = sess.run(["logits"], feeds)[0]
    del sess  # its weights (the whole quantized model, pre-packed) are not held during the PyTorch forward
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.float().numpy()
    return float(np.max(np.abs(got.astype(np.float32) - ref))), float(np.max(np.abs(ref)))


def check_folder(folder: Path, model: torch.nn.Module, kv: dict, tolerance: Tolerance, *,
                 accuracy_level: int = 0) -> dict:
    """Validate the folder (see the module docstring): the `validation` record of quant_config.json, with `passed`.
    The limit applies to the level-0 run; `accuracy_level_max_abs_logit_diff` is the saved level's difference."""
    exact_graph = None
    if accuracy_level:
        from qcompiler.passes import PassManager, SetAccuracyLevel

        proto = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
        exact_graph = PassManager([SetAccuracyLevel(0)]).run(proto).model.SerializeToString()
    diff, scale = validate_logits(folder, model, kv, graph=exact_graph)
    limit = tolerance.atol + tolerance.rtol * scale
    record = {"max_abs_logit_diff": diff, "max_abs_logit": scale, "atol": tolerance.atol, "rtol": tolerance.rtol,
              "limit": limit, "passed": diff <= limit}
    if accuracy_level and record["passed"]:
        record["accuracy_level_max_abs_logit_diff"] = validate_logits(folder, model, kv)[0]
    return record


def failure_message(record: dict, rejected: Path) -> str:
    return (f"validation failed: ONNX Runtime logits differ from PyTorch by {record['max_abs_logit_diff']:.3g} "
            f"(> --atol {record['atol']:g} + --rtol {record['rtol']:g} × max |logit| {record['max_abs_logit']:.3g} = "
            f"{record['limit']:.3g}); the export was kept in {rejected} for inspection (`qcompiler eval` runs on it)")
