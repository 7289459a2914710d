#!/usr/bin/env bash
# onnxruntime-gpu for the lent GPU machine, cut to fit the device tool's carry (64 MiB a call, working tree included),
# so that a GPU session can also check the kernels through ONNX Runtime's CUDA EP (scripts/gpu_check_ort.sh). Run
# here (pip reaches the package registry; the GPU machine reaches nothing):
#
#   bash scripts/ort_gpu_parts.sh            # -> .ortgpu/p1 .. .ortgpu/pN (git-ignored), and the ORT headers
#
# The wheel is for that machine: CPython 3.12, x86-64, CUDA 13 (onnxruntime-gpu >= 1.31 links libcublas.so.13 and
# libcudart.so.13, which its PyTorch's nvidia-* packages provide). Then, on the device, one `run` per part, back to
# back while the machine stays warm (its idle release is 30 s): carry [".ortgpu/pI"] with
#   bash scripts/gpu_check_ort.sh            # stashes the part in /tmp; once all are there, installs and checks
# Part 1 holds the ONNX Runtime headers (for building the op library there), the wheel's SHA-256 and the part count.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${ORT_GPU_VERSION:-1.31.1}
part_mb=${ORT_GPU_PART_MB:-58}  # the tracked tree is ~1.5 MB; each call carries one part beside it
dest=.ortgpu
rm -rf "$dest"
mkdir -p "$dest/wheel"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dest/wheel" "onnxruntime-gpu==$version"
wheel=$(ls "$dest"/wheel/onnxruntime_gpu-*.whl)
headers=$(ls -d build/*/_deps/libonnxruntime-dev/root/usr/include/onnxruntime 2>/dev/null | head -1 || true)
if [ -z "$headers" ]; then
  echo "no ONNX Runtime headers under build/ (run scripts/setup.sh first: its build fetches them)" >&2
  exit 1
fi
split -b "${part_mb}M" -d -a 2 "$wheel" "$dest/wheel/part."
n=0
for f in "$dest"/wheel/part.*; do
  n=$((n + 1))
  mkdir -p "$dest/p$n"
  mv "$f" "$dest/p$n/"
done
cp -r "$headers" "$dest/p1/include"
basename "$wheel" >"$dest/p1/WHEEL"
(cd "$dest/wheel" && sha256sum "$(basename "$wheel")" | cut -d' ' -f1) >"$dest/p1/SHA256"
echo "$n" >"$dest/p1/PARTS"
rm -rf "$dest/wheel"
du -sh "$dest"/p* | sed 's/^/  /'
echo "$(basename "$wheel"): $n parts; on the device, one run per part: carry [\"$dest/pI\"], command" \
  "'bash scripts/gpu_check_ort.sh'"
