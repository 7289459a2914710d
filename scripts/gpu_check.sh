#!/usr/bin/env bash
# The CUDA kernels' checks for a session that is lent a GPU machine, as one prepared run there (the `device` tool's
# `run`, from the repository root; timeout_s ~ 560). It needs what that machine's image has — PyTorch with CUDA,
# nvcc, numpy, onnx, pytest — and neither onnxruntime-gpu nor a CUDA build of the op library: the kernels are built
# by nvcc for the GPU at hand and called directly (tests/cuda_direct.py).
#   1. the kernel tests on the GPU (`direct` backend of tests/test_spqr_matmul_cuda.py; a skip is an error),
#   2. the benchmark vs fp16 cuBLAS, with the decode GEMV's X staging modes and rows per warp and the prefill
#      kernel's tiles side by side (bench/kernels_cuda_direct.py).
# Results and logs under $OUT (the tool's), else ./gpu-out.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv; nvcc --version | tail -2; } \
  2>&1 | tee "$out/gpu.txt"
QCOMPILER_REQUIRE_GPU=1 timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -k direct \
  tests/test_spqr_matmul_cuda.py 2>&1 | tee "$out/tests.log"
tests=$?
timeout 300 python3 -m bench.kernels_cuda_direct --gemv-x slabs --gemv-rows 4,2,1 --prefill-tile 64,128 \
  -o "$out/kernels-cuda-direct.md" 2>&1 | tee "$out/bench.log"
bench=$?
echo "tests exit $tests, benchmark exit $bench"
exit $((tests || bench))
