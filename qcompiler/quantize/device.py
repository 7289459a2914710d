"""`--device`: where calibration and the solvers run, one decoder layer at a time.

The model stays where it was loaded (CPU memory, or file pages with `--offload-weights`). The calibration engine
(qcompiler/quantize/calibration.py) moves the captured layer inputs to the device once, then each decoder layer in
turn (`on_device`): the layer's parameters are copied there for its Hessians, solves and forward, and on the way back
their values — the quantized weights the solvers installed — are copied into the original tensors, which the layer
gets back. Nothing of the layer is reallocated on the host: a file-backed weight stays file-backed. Solvers take their
device from the weight and the Hessian they are given, and return `SpQRWeight`s in host memory (numpy).

Only the calibration engine's methods (RTN per linear, GPTQ, SpQR with its `--target-bits` probe) run on a device;
AffineQuant's training loop does not yet (a one-line error).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Optional

import torch

from qcompiler import QCompilerError

_SPEC = re.compile(r"^(cpu|cuda(:\d+)?)$")


def resolve_device(spec: Optional[str]) -> torch.device:
    """The `torch.device` for `--device` (`cpu`, `cuda`, `cuda:N`; `auto` or None: the first CUDA device when
    PyTorch sees one, else the CPU). A device PyTorch cannot use is a one-line QCompilerError."""
    if spec is None or spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    text = str(spec).strip().lower()
    if not _SPEC.match(text):
        raise QCompilerError(f"--device must be cpu, cuda, cuda:N or auto (got {spec!r})")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise QCompilerError(f"--device {text}: PyTorch sees no CUDA device (torch {torch.__version__}, {build})")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise QCompilerError(f"--device {text}: PyTorch sees {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def to_device(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor inside (tuples, lists, dicts, nested) moved to `device`; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        moved = [to_device(x, device) for x in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else tuple(moved)
    if isinstance(obj, list):
        return [to_device(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def home_device(module: torch.nn.Module) -> torch.device:
    """The device of `module`'s first parameter (CPU when it has none)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: Optional[torch.device]) -> Iterator[None]:
    """Run the block with `module`'s parameters and buffers as copies on `device`; on exit each parameter's value
    (changed in place by the block, e.g. a solver's installed weight) is copied back into its original tensor, and
    the originals are put back. A no-op where `device` is None or already the parameters' device."""
    if device is None or home_device(module) == device:
        yield
        return
    slots = [(m, name, p) for m in module.modules() for name, p in m._parameters.items() if p is not None]
    buffers = [(m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    moved: dict[int, Optional[torch.nn.Parameter]] = {}  # tied parameters move once
    try:
        for m, name, p in slots:
            if id(p) not in moved:
                moved[id(p)] = torch.nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
            m._parameters[name] = moved[id(p)]
        for m, name, b in buffers:
            m._buffers[name] = b.to(device)
        yield
        with torch.no_grad():
            for m, name, p in slots:
                if moved[id(p)] is not None:
                    p.copy_(moved[id(p)])  # into the host tensor (file pages stay file pages)
                    moved[id(p)] = None
    finally:
        for m, name, p in slots:
            m._parameters[name] = p
        for m, name, b in buffers:
            m._buffers[name] = b
