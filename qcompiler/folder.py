"""The exported folder: the names of its files, and writing it atomically. Everything is written to a hidden sibling
folder first and renamed into place at the end, so an error or Ctrl-C never leaves a half-written OUT behind.
What goes into it is written by `qcompiler.emit`; the runtime reads it back by these names."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from qcompiler import QCompilerError

MODEL_FILE = "model.onnx"
CONFIG_FILE = "quant_config.json"
MANIFEST_FILE = "manifest.json"
LIBRARY_FILE = "libqcompiler_ops.so"  # a copy of the op library, so OUT runs with onnxruntime alone
REJECTED_SUFFIX = ".rejected"  # where a complete export that failed validation is kept


def check_output(output: str | os.PathLike, *, force: bool) -> Path:
    """Fail early (before any work) if OUT exists and `force` is not set."""
    out = Path(output)
    if out.exists() and not force:
        raise QCompilerError(f"output '{out}' already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise QCompilerError(f"output '{out}' exists and is not a folder")
    parent = out.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise QCompilerError(f"parent of output is not a folder: {parent}")
    return out


@contextlib.contextmanager
def atomic_output(output: str | os.PathLike, *, force: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `output`; on success replace `output` with it, on error remove it."""
    out = check_output(output, force=force).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)  # like `mkdir -p`: `-o out/run1` works on a fresh clone
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        publish_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def set_aside(tmp: Path, output: str | os.PathLike) -> Path:
    """Move the temporary folder of `atomic_output` to `OUT.rejected` (replacing an older one) instead of OUT: a
    complete export that must not be published but is worth keeping. Returns the new path."""
    out = Path(output).resolve()
    rejected = out.with_name(out.name + REJECTED_SUFFIX)
    shutil.rmtree(rejected, ignore_errors=True)
    publish_permissions(tmp)
    os.replace(tmp, rejected)
    return rejected


def publish_permissions(folder: Path) -> None:
    """mkdtemp makes the folder 0700 and some writers create 0600 files: give the folder and its files the modes a
    plain `mkdir`/`open` would (0777/0666 minus the umask), so a server running as another user can read OUT."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
