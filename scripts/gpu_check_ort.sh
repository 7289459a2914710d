#!/usr/bin/env bash
# The kernels through ONNX Runtime's CUDA EP, on the lent GPU machine (the `device` tool's `run`, repository root),
# with onnxruntime-gpu brought in parts (scripts/ort_gpu_parts.sh, run here first). One run per part, back to back
# while the machine stays warm, each carrying one part: carry [".ortgpu/pI"], command `bash scripts/gpu_check_ort.sh`.
# Each run stashes its part in /tmp (kept while the machine is held); the run that completes the set
#   1. installs the wheel (checked against its SHA-256) into /tmp and puts the image's CUDA 13 libraries (PyTorch's
#      nvidia-* packages) on the loader path,
#   2. builds the op library with its CUDA kernel for this GPU (cmake + nvcc, the carried ORT headers),
#   3. runs the `cuda` backend of tests/test_spqr_matmul_cuda.py (a skip is an error: QCOMPILER_REQUIRE_CUDA_EP=1),
#   4. times bench/kernels_gpu.py (SpQRMatMul vs fp16 MatMul vs MatMulNBits 4-bit, all on the CUDA EP).
# Results and logs under $OUT (the tool's), else ./gpu-out. Independent of scripts/gpu_check.sh (no ORT needed there).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
stash=${QC_ORTGPU_STASH:-/tmp/qc-ortgpu}
mkdir -p "$stash"
for d in .ortgpu/p*; do
  [ -d "$d" ] && cp -r "$d"/. "$stash"/
done
have=$(ls "$stash"/part.* 2>/dev/null | wc -l)
if [ ! -f "$stash/PARTS" ] || [ "$have" -lt "$(cat "$stash/PARTS")" ]; then
  echo "stashed $have part(s) of $(cat "$stash/PARTS" 2>/dev/null || echo '? (part 1 not yet carried)'):" \
    "carry the next one"
  exit 0
fi

site=$stash-site
if [ ! -d "$site/onnxruntime" ]; then
  wheel=$stash/$(cat "$stash/WHEEL")
  cat "$stash"/part.* >"$wheel"
  echo "$(cat "$stash/SHA256")  $wheel" | sha256sum -c - || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel" || exit 1
fi
export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
libs=$(python3 -c "
import glob, nvidia
print(':'.join(sorted({p for b in nvidia.__path__ for p in glob.glob(b + '/**/lib', recursive=True)})))")
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, ort.get_available_providers())" \
  2>&1 | tee "$out/ort.txt"

arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
{ cmake -S custom_ops -B /tmp/qc-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DWITH_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" -DONNXRUNTIME_INCLUDE_DIR="$stash/include" &&
  cmake --build /tmp/qc-build; } >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
export QCOMPILER_OPS_LIBRARY=/tmp/qc-build/libqcompiler_ops.so

QCOMPILER_REQUIRE_CUDA_EP=1 timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -k "not direct" \
  tests/test_spqr_matmul_cuda.py 2>&1 | tee "$out/ort-tests.log"
tests=$?
timeout 300 python3 -m bench.kernels_gpu -o "$out/kernels-gpu.md" 2>&1 | tee "$out/ort-bench.log"
bench=$?
echo "ORT CUDA EP: tests exit $tests, benchmark exit $bench"
exit $((tests || bench))
