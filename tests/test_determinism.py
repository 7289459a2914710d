"""Same inputs + seed → byte-identical exported model (graph and external data)."""

from __future__ import annotations

import pytest

from qcompiler.cli import main


@pytest.mark.parametrize("method, flags", [("rtn", ["--bits", "3", "--group-size", "16"]),
                                           ("spqr", ["--preset", "sub4", "--nsamples", "4", "--seqlen", "32"])])
def test_two_exports_are_byte_identical(method, flags, tiny_dirs, text_file, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        calib = ["--calibration", str(text_file)] if method != "rtn" else []
        assert main(["export", str(tiny_dirs("llama")), "--method", method, *flags, *calib, "-o", str(out),
                     "-q"]) == 0
        outs.append(out)
    a, b = outs
    files = sorted(p.name for p in a.iterdir() if p.name.startswith("model.onnx"))
    assert files and files == sorted(p.name for p in b.iterdir() if p.name.startswith("model.onnx"))
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs between two identical exports"
