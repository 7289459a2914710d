"""An export killed while it writes its output leaves no output folder and no temporary folder; a rerun succeeds."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from qcompiler.cli import main

# The export in a child process whose validation step (inside the atomic output block, after model.onnx is written)
# waits, so the signal always lands mid-emit.
CHILD = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job (CI) may inherit SIGINT ignored
import qcompiler.validate as validate
_validate = validate.validate_logits
def slow_validate(*args, **kwargs):
    time.sleep(120)
    return _validate(*args, **kwargs)
validate.validate_logits = slow_validate
from qcompiler.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_emit_leaves_nothing(sig, tiny_dirs, tmp_path):
    out = tmp_path / "out"
    args = ["export", str(tiny_dirs("llama")), "--method", "rtn", "--bits", "4", "--group-size", "16", "-o", str(out),
            "-q"]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    written = False
    while proc.poll() is None and time.monotonic() < deadline:
        tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        if tmps and (tmps[0] / "manifest.json").exists():  # model.onnx and manifest written, validation pending
            written = True
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert written, f"never saw the temporary output: {err.decode()[-500:]}"
    assert proc.returncode == 130, err.decode()[-500:]
    assert not out.exists()
    assert not list(tmp_path.iterdir()), "temporary folders left behind"
    assert main(args) == 0 and (out / "model.onnx").is_file()  # a rerun in the same place works
