"""`qcompiler.runtime.ops`: finding, describing and registering libqcompiler_ops.so (the SpQRMatMul custom-op library)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from qcompiler.runtime import ops
from tests.builders import random_weight
from tests.builders import single_op_model
from tests.builders import has_cuda_kernel


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return single_op_model(random_weight(N=16, K=64, bits=4, group_size=32, seed=0)).SerializeToString()


def test_library_is_installed():
    p = ops.library_path()
    assert p.is_file() and p.name == "libqcompiler_ops.so"
    assert p.parent.name == "_lib" and p.parent.parent.name == "qcompiler"


def test_env_var_overrides_and_is_checked(monkeypatch, tmp_path):
    real = ops.library_path()
    copy = tmp_path / "custom.so"
    shutil.copy(real, copy)
    monkeypatch.setenv(ops.ENV_VAR, str(copy))
    assert ops.library_path() == copy.resolve()
    monkeypatch.setenv(ops.ENV_VAR, str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match="QCOMPILER_OPS_LIBRARY"):
        ops.library_path()


def test_missing_library_error_says_how_to_build(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    monkeypatch.setattr(ops, "_candidates", lambda: [])
    with pytest.raises(FileNotFoundError, match=r"pip install \."):
        ops.library_path()


def test_session_from_bytes_and_path_default_cpu(model_bytes, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(model_bytes)
    x = np.ones((1, 1, 64), np.float32)
    outs = []
    for model in (model_bytes, path, str(path)):
        sess = ops.session(model)
        assert sess.get_providers() == ["CPUExecutionProvider"]
        outs.append(sess.run(None, {"X": x})[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_without_library_ort_rejects_the_op(model_bytes):
    with pytest.raises(Exception, match="SpQRMatMul"):
        ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def test_session_options_are_extended(model_bytes):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ops.session(model_bytes, sess_options=so)
    assert sess.run(None, {"X": np.zeros((2, 3, 64), np.float32)})[0].shape == (2, 3, 16)


def _sections(lib) -> set[str]:
    out = subprocess.run(["readelf", "-S", "-W", str(lib)], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"^\s*\[\s*\d+\]\s+(\S+)", out, flags=re.M))


def _nvcc_found() -> bool:  # what CMake's WITH_CUDA=AUTO looks for (custom_ops/CMakeLists.txt)
    return bool(shutil.which("nvcc") or os.environ.get("CUDACXX") or Path("/usr/local/cuda/bin/nvcc").exists())


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs binutils readelf")
def test_has_cuda_kernel_says_what_the_library_holds():
    """The build marker against the library itself: CUDA device code is linked in (an .nv_fatbin section) exactly
    when the marker says so, and the installed build (not one named by $QCOMPILER_OPS_LIBRARY) has it where nvcc
    is found (CMake's WITH_CUDA=AUTO)."""
    lib = ops.library_path()
    assert has_cuda_kernel() == (".nv_fatbin" in _sections(lib))
    if _nvcc_found() and not os.environ.get(ops.ENV_VAR):
        assert has_cuda_kernel(), f"nvcc is on this machine but {lib} was built without the CUDA kernel"


def test_has_cuda_kernel_reads_build_marker(tmp_path):
    fake = tmp_path / "fake.so"
    fake.write_bytes(b"\0junk QCOMPILER_OPS_BUILD_INFO cuda=1\0")
    assert has_cuda_kernel(fake) is True
    fake.write_bytes(b"QCOMPILER_OPS_BUILD_INFO cuda=0")
    assert has_cuda_kernel(fake) is False


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs binutils readelf")
def test_library_exports_only_the_entry_point_and_links_no_runtime():
    lib = str(ops.library_path())
    syms = subprocess.run(["readelf", "--dyn-syms", "-W", lib], capture_output=True, text=True, check=True).stdout
    exported = {
        line.split()[7].split("@")[0]
        for line in syms.splitlines()
        if len(line.split()) >= 8 and line.split()[4] == "GLOBAL" and line.split()[6] != "UND"
    }
    assert exported - {"VERS_1.0"} == {"RegisterCustomOps"}  # VERS_1.0: the version script's node
    dyn = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True, check=True).stdout
    needed = [line for line in dyn.splitlines() if "(NEEDED)" in line]
    assert needed and not any("onnxruntime" in line or "cudart" in line for line in needed), needed
