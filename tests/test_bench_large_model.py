"""bench/large_model.py end to end on a small config (the real run is > 2 GB): source → export → reload, and the
table it writes."""

from __future__ import annotations



def test_large_model_script_small_config(tmp_path):
    out = tmp_path / "large.md"
    from bench import large_model as large

    code = large.main(["--vocab", "600", "--hidden", "64", "--intermediate", "96", "--layers", "1",
                       "--keep", str(tmp_path / "work"), "-o", str(out)])
    assert code == 0
    text = out.read_text()
    for row in ("| parameters |", "| export |", "| emitted |", "| validation (in the export) |", "| reload in ORT |"):
        assert row in text, text
    assert "7 quantized linears" in text and "peak RSS" in text
    assert (tmp_path / "work" / "out" / "model.onnx.data").is_file()
