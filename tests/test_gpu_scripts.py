"""scripts/gpu_check_ort.sh where no GPU is: its part stashing across device runs (each run carries one part of the
onnxruntime-gpu wheel, scripts/ort_gpu_parts.sh) and the reassembly checked against the wheel's SHA-256 — the steps
that, done wrong, would waste the runs of a GPU session. The install, build and GPU steps need that machine."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(repo: Path, stash: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check_ort.sh"], cwd=repo, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(repo / "out"), "QC_ORTGPU_STASH": str(stash)})


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs sha256sum")
@pytest.mark.parametrize("good_hash", [True, False])
def test_parts_are_stashed_until_complete_then_reassembled_in_order(tmp_path, good_hash):
    repo, stash = tmp_path / "repo", tmp_path / "stash"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "gpu_check_ort.sh", repo / "scripts")
    wheel = bytes(range(256)) * 40 + b"tail"  # cut in three unequal parts, as `split -b` does
    parts = [wheel[:4096], wheel[4096:8192], wheel[8192:]]
    digest = hashlib.sha256(wheel if good_hash else wheel[::-1]).hexdigest()

    def carry(i: int) -> subprocess.CompletedProcess:  # the device run that carries part i (1-based) alone
        shutil.rmtree(repo / ".ortgpu", ignore_errors=True)
        d = repo / ".ortgpu" / f"p{i}"
        d.mkdir(parents=True)
        (d / f"part.{i - 1:02d}").write_bytes(parts[i - 1])
        if i == 1:
            (d / "PARTS").write_text("3\n")
            (d / "WHEEL").write_text("fake-0-py3-none-any.whl\n")
            (d / "SHA256").write_text(digest + "\n")
        return _run(repo, stash)

    r = carry(3)
    assert r.returncode == 0 and "stashed 1 part(s) of ? (part 1 not yet carried)" in r.stdout
    r = carry(1)
    assert r.returncode == 0 and "stashed 2 part(s) of 3" in r.stdout
    r = carry(2)  # the set is complete: reassembled, checked, then installed (a fake wheel: pip refuses it)
    assert r.returncode == 1
    assert (stash / "fake-0-py3-none-any.whl").read_bytes() == wheel
    assert ("OK" if good_hash else "FAILED") in r.stdout + r.stderr
    assert not (stash.parent / "stash-site" / "onnxruntime").exists()
