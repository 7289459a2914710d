"""Netron renders an exported model: served by `netron`, loaded in headless Chromium, a SpQRMatMul node selected;
its properties panel shows the module-path name, the attributes, the description and the function overload."""

from __future__ import annotations

import pytest

from qcompiler.tools.netron_view import find_chromium

pytest.importorskip("netron")
pytest.importorskip("selenium")
if None in find_chromium():
    pytest.skip("Chromium / chromedriver not installed (Debian: apt-get install chromium chromium-driver)",
                allow_module_level=True)


def test_netron_shows_spqr_node_names_and_attributes(tiny_export, tmp_path, capsys):
    from tests.helpers import run_cli

    folder = tiny_export("llama", "rtn", "--bits", "3", "--group-size", "16")
    png = tmp_path / "netron.png"
    code, out, err = run_cli(capsys, "inspect", folder, "--screenshot", png, "--port", 18090)
    assert code == 0, err
    assert png.stat().st_size > 20_000  # a rendered graph, not a blank page
    from qcompiler.tools.netron_view import screenshot

    panel = screenshot(folder, tmp_path / "again.png", port=18092)
    for text in ("SpQRMatMul:w3s0", "model.layers.0.self_attn.q_proj+k_proj+v_proj/SpQRMatMul", "3-bit, group 16",
                 "group_size", "stat_bits", "model.layers.0.self_attn.q_proj+k_proj+v_proj/qweight"):
        assert text in panel, f"{text!r} not in Netron's panel:\n{panel}"
