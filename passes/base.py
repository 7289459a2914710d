"""Pass contract and the PassManager: run passes in order, verify and dump between them, time each one."""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import time
from typing import ClassVar, Optional, Sequence

import onnx
import onnx_ir as ir

from qcompiler.graph.edit import PassError
from qcompiler.graph.ir_convert import to_ir, to_proto

log = logging.getLogger("qcompiler.passes")

# protobuf cannot serialize a single message above 2 GiB; larger models are checked/dumped through files.
_PROTO_LIMIT = 2**31 - 1


@dataclasses.dataclass
class PassResult:
    """What one pass did.

    Attributes:
        model: the model after the pass (an `ir.Model`; may be the same object, modified in place).
        modified: whether the pass changed anything.
        counts: named counters for logs and tests (e.g. `{"replaced": 210}`).
        notes: human-readable remarks (e.g. why a candidate was skipped).
    """

    model: ir.Model
    modified: bool
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PassContext:
    """Debugging options shared by all passes (they live here, not inside passes)."""

    verify_each: bool = False
    dump_dir: Optional[str] = None
    # with verify_each: inputs on which passes that claim `preserves_outputs` are run in ONNX Runtime before and
    # after (the pass fails if any output moves by more than `verify_atol`)
    verify_feeds: Optional[dict] = None
    verify_atol: float = 1e-4


class Pass(abc.ABC):
    """One graph rewrite. Subclasses set `name` (kebab-case) and implement `call`; `requires` and `ensures`
    check pre/postconditions and raise `PassError` (or AssertionError) with the reason."""

    name: ClassVar[str] = "pass"
    preserves_outputs: ClassVar[bool] = False  # exact rewrite: `verify_each` checks outputs in ONNX Runtime

    def requires(self, model: ir.Model) -> None:  # noqa: B027 - optional hook
        """Precondition check, run before `call`."""

    @abc.abstractmethod
    def call(self, model: ir.Model) -> PassResult:
        """Rewrite `model` and report what changed."""

    def ensures(self, model: ir.Model, result: PassResult) -> None:  # noqa: B027 - optional hook
        """Postcondition check, run after `call` when verification is on."""


@dataclasses.dataclass
class PipelineResult:
    """The final model (a `onnx.ModelProto`, serialized once after the last pass) and, per pass in order,
    `(name, PassResult, seconds)`."""

    model: onnx.ModelProto
    steps: list[tuple[str, PassResult, float]]

    def summary(self) -> str:
        lines = []
        for name, res, secs in self.steps:
            counts = ", ".join(f"{k}={v}" for k, v in res.counts.items())
            lines.append(f"{name:<22} {secs:7.2f}s  modified={res.modified}  {counts}")
        return "\n".join(lines)


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker on a model of any size (through a temporary file above protobuf's 2 GiB limit)."""
    if model.ByteSize() < _PROTO_LIMIT:
        onnx.checker.check_model(model)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(model, path, save_as_external_data=True, location="model.onnx.data")
        onnx.checker.check_model(path)


def save_model(model: onnx.ModelProto, path: str, *, external_data: bool = True, consume: bool = False) -> None:
    """Save `model` to `path` with its tensors in `<path>.data` (small tensors stay inline).

    `consume`: write `model` itself instead of a copy, which turns its large tensors into references to the data file
    (their bytes are dropped from memory as they are written): no second copy of the weights at the peak. `model`
    then only loads again with the data file next to it.
    """
    from qcompiler.graph.external import all_tensors, is_borrowed, save_with_external_data, tensor_bytes

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not consume and (external_data or any(is_borrowed(t) for t in all_tensors(model))):
        model_copy = onnx.ModelProto()
        model_copy.CopyFrom(model)  # borrowed tensors (qcompiler.graph.external) copy as references, not bytes
        model = model_copy
    if external_data:
        save_with_external_data(model, path, location=os.path.basename(path) + ".data", size_threshold=1024)
    else:
        for t in all_tensors(model):
            if is_borrowed(t):
                raw = tensor_bytes(t)
                del t.external_data[:]
                t.data_location = onnx.TensorProto.DEFAULT
                t.raw_data = raw
        onnx.save(model, path)


def _run_ort(model: onnx.ModelProto, feeds: dict) -> dict:
    """All graph outputs of `model` on `feeds` in ONNX Runtime (CPU, with the SpQRMatMul library)."""
    from qcompiler.runtime.ops import session

    if model.ByteSize() >= _PROTO_LIMIT:
        raise PassError("verify-each: model above 2 GiB cannot be run from memory")
    sess = session(model.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def _check_same(before: dict, after: dict, atol: float) -> None:
    import numpy as np

    if set(before) != set(after):
        raise PassError(f"outputs changed: {sorted(set(before) ^ set(after))}")
    worst = max((float(np.max(np.abs(before[k].astype(np.float64) - after[k]))) if before[k].size else 0.0, k)
                for k in before)
    if not worst[0] <= atol:
        raise PassError(f"output {worst[1]} moved by {worst[0]:.3g} (> {atol:g}) on the verify-each inputs")


class PassManager:
    """Runs passes in order. `verify_each` runs onnx.checker and each pass's `ensures` after it; `dump_dir`
    writes `NN_<pass-name>.onnx` after each pass."""

    def __init__(self, passes: Sequence[Pass], *, context: Optional[PassContext] = None):
        self.passes = list(passes)
        self.context = context or PassContext()

    def run(self, model: "onnx.ModelProto | ir.Model") -> PipelineResult:
        """Run the passes on `model` (a proto is converted to onnx-ir once, here); returns the result as a proto
        (`qcompiler.graph.ir_convert.to_proto`: what the exporter's proto would have become, byte for byte)."""
        if isinstance(model, onnx.ModelProto):
            model = to_ir(model)
        steps: list[tuple[str, PassResult, float]] = []
        for index, p in enumerate(self.passes, start=1):
            before = [s[0] for s in steps]
            start = time.perf_counter()
            compare = self.context.verify_each and p.preserves_outputs and self.context.verify_feeds is not None
            try:
                p.requires(model)
                reference = _run_ort(to_proto(model), self.context.verify_feeds) if compare else None
                result = p.call(model)
                if self.context.verify_each:
                    proto = to_proto(result.model)
                    check_model(proto)
                    p.ensures(result.model, result)
                    if compare:
                        _check_same(reference, _run_ort(proto, self.context.verify_feeds), self.context.verify_atol)
                    del proto
            except PassError as e:
                raise PassError(f"pass '{p.name}' failed (after {before or 'no passes'}): {e}") from e
            except (AssertionError, ValueError, onnx.checker.ValidationError) as e:
                raise PassError(f"pass '{p.name}' failed (after {before or 'no passes'}): {e}") from e
            secs = time.perf_counter() - start
            model = result.model
            steps.append((p.name, result, secs))
            log.info("pass %-18s %.2fs %s", p.name, secs, result.counts)
            if self.context.dump_dir:
                save_model(to_proto(model), os.path.join(self.context.dump_dir, f"{index:02d}_{p.name}.onnx"),
                           consume=True)
        return PipelineResult(model=to_proto(model), steps=steps)


def run_pass(p: Pass, model: "onnx.ModelProto | ir.Model", *, ensures: bool = False) -> PassResult:
    """One pass on a proto (converted in, the result converted back to a proto), optionally checking `ensures` on
    the way: for tests and one-off scripts. The driver runs passes through `PassManager`."""
    if isinstance(model, onnx.ModelProto):
        model = to_ir(model)
    result = p.call(model)
    if ensures:
        p.ensures(result.model, result)
    return dataclasses.replace(result, model=to_proto(result.model))
