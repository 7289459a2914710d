"""Static checks of the CUDA kernels' machine code (sm_90), where nvcc is: no register spills in any kernel, no call
(the 64-bit division routine: ~100 instructions) in the decode GEMV's slab loop, nor anywhere in the prefill and row
kernels — the regressions that cost the decode kernel most before (17 calls in its slab loop). Counts are
bench/cuda_sass.py's job; these only fail on a spill or a call."""

from __future__ import annotations

import re

import pytest

from tests.cuda_emu import GEMV_ROWS


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from bench import cuda_sass as tool

    nvcc = tool.find_tool("nvcc", required=False)
    if nvcc is None or tool.find_tool("cuobjdump", required=False) is None or \
            tool.find_tool("nvdisasm", required=False) is None:
        pytest.skip("needs nvcc, cuobjdump and nvdisasm")
    report, sass = tool.compile_sass(tool.SRC, "sm_90", tmp_path_factory.mktemp("sass"), nvcc)
    yield report, sass, tool


def test_no_kernel_spills(compiled):
    ptxas, _, _ = compiled
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    assert len(spills) >= 63  # 54 decode GEMV instantiations, 2 row kernels, 6 prefill, permute
    assert all(s == ("0", "0") for s in spills), ptxas


@pytest.mark.parametrize("x", ["6__half", "f"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("mt,rows", [(mt, r) for mt, rs in GEMV_ROWS.items() for r in rs])
def test_decode_slab_loop_calls_nothing(compiled, x, bits, mt, rows):
    _, sass, tool = compiled
    assert rows in tool.GEMV_ROWS[mt]
    body = tool.hot_loop(sass, f"SpQRGemvKernelI{x}Li{bits}ELi{mt}ELi{rows}E")
    # the loop was found: a byte permute per code and an FMA per code and row of X
    assert len(body) > rows * 32 * (1 + mt)
    calls = [b for b in body if "CALL" in b]
    assert not calls, calls


def test_gemv_cost_model_matches_the_compiled_slab_loops(compiled):
    """The launcher's rows-per-warp model (kGemvSlabInstr in launcher.cu) holds bench/cuda_sass.py's counts of the slab
    loops (sm_90, fp16 X, 3 bits, β1 = 16, 3-bit statistics); a kernel change that moves them by more than 10 % must
    update the table."""
    _, _, tool = compiled
    src = tool.COST_MODEL.read_text()
    body = re.search(r"kGemvSlabInstr\[4\]\[3\] = \{[^\n]*\n(.*?)\};", src, re.S).group(1)
    table = [list(map(int, row)) for row in re.findall(r"\{(\d+), (\d+), (\d+)\}", body)]
    assert len(table) == 4
    sass = tool.pinned_sass("sm_90", 3, 16)
    for i, mt in enumerate((1, 2, 4, 8)):
        for j, rows in enumerate((1, 2, 4)):
            if rows not in tool.GEMV_ROWS[mt]:
                assert table[i][j] == 0, (mt, rows)
                continue
            measured = tool.slab_loop_size(sass, "half", 3, mt, rows)
            assert abs(table[i][j] - measured) <= 0.1 * measured, (mt, rows, table[i][j], measured)


@pytest.mark.parametrize("kernel", ["SpQRMatMulPrefillKernel*PrefillTileILi64E", "SpQRMatMulPrefillKernel*PrefillTileILi128E",
                                    "SpQRMatMulKernelIfE", "SpQRMatMulKernelI6__halfE"])
def test_other_kernels_call_nothing(compiled, kernel):
    _, sass, tool = compiled
    assert not re.findall(r"\bCALL\b", tool.function_sass(sass, kernel))
