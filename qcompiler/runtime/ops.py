"""Loading `libqcompiler_ops.so`, the ONNX Runtime custom-op library implementing `qcompiler::SpQRMatMul`.

The library is built from `custom_ops/` by `pip install .` (or `pip install -e .`) and installed as
`qcompiler/_lib/libqcompiler_ops.so`. It always has a CPU kernel, and a CUDA kernel when nvcc was found at build time.

    from qcompiler.runtime import ops
    sess = ops.session("model.onnx")                      # CPU
    sess = ops.session("model.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Optional, Sequence, Union

LIBRARY_NAME = "libqcompiler_ops.so"
ENV_VAR = "QCOMPILER_OPS_LIBRARY"


def _candidates() -> list[pathlib.Path]:
    """Where an installed build may be: next to this package (regular install), or, for a scikit-build-core editable
    install (the package imports from the source tree), in `site-packages/qcompiler/_lib`."""
    here = pathlib.Path(__file__).resolve().parent.parent  # the qcompiler package (this file is qcompiler/runtime/ops.py)
    dirs = [here / "_lib"]
    pkg = sys.modules.get(__package__ or "qcompiler")
    for p in getattr(pkg, "__path__", []) or []:
        dirs.append(pathlib.Path(p) / "_lib")
    for entry in sys.path:
        if entry:
            dirs.append(pathlib.Path(entry) / "qcompiler" / "_lib")
    seen, out = set(), []
    for d in dirs:
        f = d / LIBRARY_NAME
        if f not in seen:
            seen.add(f)
            out.append(f)
    return out


def library_path() -> pathlib.Path:
    """Path of `libqcompiler_ops.so`: `$QCOMPILER_OPS_LIBRARY` if set, else the installed build.

    Raises:
        FileNotFoundError: with the command that builds it.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        p = pathlib.Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"${ENV_VAR}={env} does not point to a file")
        return p.resolve()
    for p in _candidates():
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"{LIBRARY_NAME} (the qcompiler::SpQRMatMul ONNX Runtime custom ops) was not found next to the qcompiler "
        "package. Build and install it from the repository root with `pip install .` (or `pip install -e .`; "
        "add `--no-build-isolation` to reuse installed build tools), or point "
        f"${ENV_VAR} at a built library."
    )


def session_options(sess_options=None):
    """`sess_options` (or new `SessionOptions`) with the custom-op library registered (register it once per
    `SessionOptions`: ORT refuses a second registration of the `qcompiler` domain)."""
    import onnxruntime as ort

    so = sess_options if sess_options is not None else ort.SessionOptions()
    so.register_custom_ops_library(str(library_path()))
    return so


def session(
    model: Union[str, os.PathLike, bytes],
    providers: Optional[Sequence] = None,
    sess_options=None,
):
    """An `onnxruntime.InferenceSession` for `model` (path or serialized bytes) with the SpQRMatMul ops registered.

    Args:
        model: path to an .onnx file, or the serialized model (`ModelProto.SerializeToString()`).
        providers: ORT execution providers; default `["CPUExecutionProvider"]`.
        sess_options: `onnxruntime.SessionOptions` to extend; the library is registered on it here, so pass options
            on which it is not registered yet.
    """
    import onnxruntime as ort

    so = session_options(sess_options)
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    return ort.InferenceSession(model, so, providers=list(providers) if providers else ["CPUExecutionProvider"])
