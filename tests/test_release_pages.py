"""The CPU kernel releases the stored weights it packed (custom_ops/src/cpu/packed.h, ReleasePages): ONNX Runtime maps
a model's external data, the packing reads those pages once, and MADV_PAGEOUT takes them out of the resident set, so a
session holds one resident copy of each weight. Measured in a fresh process per case (/proc/self/status RssFile);
QCOMPILER_CPU_KEEP_PAGES=1 keeps them (the control). Outputs are the same either way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and MADV_PAGEOUT are Linux's")

_CHILD = r"""
import json, sys
import numpy as np
from qcompiler.runtime.ops import session

def rss_file_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])

s = session(sys.argv[1])
x = np.load(sys.argv[2])
before = rss_file_kb()
y = s.run(None, {"X": x})[0]
print(json.dumps({"grown_kb": rss_file_kb() - before, "y": y.tolist()}))
"""


@pytest.fixture(scope="module")
def mapped_model(tmp_path_factory):
    """A one-SpQRMatMul model (4-bit, 2048 x 2048: 2 MiB of codes) with its weights in an external data file."""
    import onnx

    from tests.builders import random_weight, single_op_model

    folder = tmp_path_factory.mktemp("mapped")
    w = random_weight(N=2048, K=2048, bits=4, group_size=16, stat_bits=3, stat_group_size=16, seed=0)
    onnx.save(single_op_model(w, x_shape=[1, None]), str(folder / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    np.save(folder / "x.npy", np.random.default_rng(0).normal(size=(1, 2048)).astype(np.float32))
    return folder, w.qweight.nbytes


def _run(folder: Path, keep: bool) -> dict:
    env = {**os.environ, "QCOMPILER_CPU_KEEP_PAGES": "1" if keep else "0"}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder / "model.onnx"), str(folder / "x.npy")], env=env,
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_packed_weights_leave_the_stored_pages(mapped_model):
    folder, code_bytes = mapped_model
    released, kept = _run(folder, keep=False), _run(folder, keep=True)
    # kept: the first call faulted the codes in (file-backed); released: they went out again after packing
    assert kept["grown_kb"] * 1024 >= 0.9 * code_bytes, kept["grown_kb"]
    assert released["grown_kb"] * 1024 <= 0.25 * code_bytes, released["grown_kb"]
    assert released["y"] == kept["y"]
