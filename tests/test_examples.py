"""examples/: the deployment scripts run on a tiny export and agree with `qcompiler generate` token for token."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# runs an example with `import qcompiler` made impossible: the deployment path must not need this repo's package
_NO_QCOMPILER = ("import runpy, sys; sys.modules['qcompiler'] = None; sys.argv = sys.argv[1:]; "
                 "runpy.run_path(sys.argv[0], run_name='__main__')")


def _deploy(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NO_QCOMPILER, str(REPO / "examples" / "deploy_python.py"),
                           *map(str, args)], capture_output=True, text=True, timeout=300)


def _greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    from qcompiler.runtime.generate import Generator

    return Generator(folder).generate(prompt, max_new_tokens=n, stop_at_eos=False).token_ids


@pytest.mark.parametrize("library", [True, False], ids=["library", "fallback"])
def test_deploy_python_matches_generate(tiny_export, library):
    folder = tiny_export("llama", "rtn", "--bits", "3", "--group-size", "16")
    assert (folder / "libqcompiler_ops.so").is_file()
    prompt = [5, 17, 3, 99, 42, 8]
    proc = _deploy(folder, "--ids", ",".join(map(str, prompt)), "--max-new-tokens", 10,
                   *([] if library else ["--no-library"]))
    assert proc.returncode == 0, proc.stderr
    assert [int(t) for t in proc.stdout.strip().split(",")] == _greedy(folder, prompt, 10)
    assert ("portable fallback" in proc.stderr) != library
    assert "decode" in proc.stderr and "tok/s" in proc.stderr


def test_deploy_python_prompt_text(tiny_export):
    folder = tiny_export("opt", "rtn", "--bits", "4", "--group-size", "32")
    proc = _deploy(folder, "--prompt", "w1 w2 w3 w4", "--max-new-tokens", 5)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("w1 w2 w3 w4") and len(proc.stdout.split()) > 4


@pytest.fixture(scope="session")
def cpp_decoder() -> Path:
    import shutil

    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake / a C++ compiler not found")
    proc = subprocess.run(["bash", str(REPO / "examples" / "cpp" / "build.sh")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return REPO / proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_cpp_example_matches_generate(cpp_decoder, tiny_export, kind):
    folder = tiny_export(kind, "rtn", "--bits", "3", "--group-size", "16")
    prompt = [5, 17, 3, 99, 42, 8]
    proc = subprocess.run([str(cpp_decoder), str(folder), ",".join(map(str, prompt)), "10"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [int(t) for t in proc.stdout.strip().split(",")] == _greedy(folder, prompt, 10)
    assert "decode" in proc.stderr


def test_triton_repository(tiny_export, tmp_path):
    import re

    import onnx

    folder = tiny_export("llama", "rtn", "--bits", "3", "--group-size", "16")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "triton" / "make_repository.py"), str(folder),
                           str(tmp_path / "repo")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    model_dir = tmp_path / "repo" / "spqr_llm"
    assert (model_dir / "1" / "model.onnx").is_file() and (model_dir / "libqcompiler_ops.so").is_file()
    text = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text
    assert 'model_operations { op_library_filename: "/models/spqr_llm/libqcompiler_ops.so" }' in text
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    entries = dict(re.findall(r'name: "([^"]+)"\n    data_type: (\w+)', text))
    assert set(entries) == {v.name for v in [*model.graph.input, *model.graph.output]}
    assert entries["input_ids"] == "TYPE_INT64" and entries["logits"] == "TYPE_FP32"
    assert re.search(r'name: "past_key_values.0.key"\n    data_type: TYPE_FP32\n    dims: \[ -1, 2, -1, 16 \]', text)
