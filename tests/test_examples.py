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
    from qcompiler.generate import Generator

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
