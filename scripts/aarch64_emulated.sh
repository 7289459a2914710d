#!/usr/bin/env bash
# Run the aarch64 build of the op library (scripts/cross_aarch64.sh) under qemu-aarch64 user emulation: an arm64
# Debian Python unpacked into a private root (apt-get download + dpkg -x: nothing arm64 is installed system-wide),
# the aarch64 wheels of numpy and onnxruntime, and the cases of scripts/aarch64_cases.py (the portable CPU paths vs
# the NumPy reference). Needs root + apt for qemu-user and the arm64 package index; skips with a note otherwise.
#   bash scripts/aarch64_emulated.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=build/aarch64-emu
ORT_VERSION=$(.venv/bin/python -c "import onnxruntime; print(onnxruntime.__version__)")
skip() { echo "note: $1; the emulated aarch64 run was skipped"; exit 0; }
command -v aarch64-linux-gnu-g++ >/dev/null || skip "no aarch64 cross compiler"
if ! command -v qemu-aarch64 >/dev/null; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || skip "qemu-aarch64 missing (not root)"
  apt-get install -y -qq --no-install-recommends qemu-user >/dev/null 2>&1 || skip "qemu-user not installable"
fi
if [ ! -x "$ROOT/sysroot/usr/bin/python3.11" ]; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || skip "no arm64 Python (not root)"
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get update -qq >/dev/null 2>&1 || skip "apt-get update failed"
  mkdir -p "$ROOT/debs" "$ROOT/sysroot"
  (cd "$ROOT/debs" && apt-get download -qq python3.11-minimal:arm64 libpython3.11-minimal:arm64 \
    libpython3.11-stdlib:arm64 libexpat1:arm64 zlib1g:arm64 libffi8:arm64 libssl3:arm64 libbz2-1.0:arm64 \
    liblzma5:arm64 libuuid1:arm64 libc6:arm64 libstdc++6:arm64 libgcc-s1:arm64 libcrypt1:arm64 \
    libsqlite3-0:arm64 libncursesw6:arm64 libtinfo6:arm64 libzstd1:arm64 >/dev/null 2>&1) || skip "arm64 packages"
  for d in "$ROOT"/debs/*.deb; do dpkg -x "$d" "$ROOT/sysroot"; done
  # qemu-user passes the host's (x86) /proc/cpuinfo through; ONNX Runtime's cpuinfo crashes parsing it, and qemu
  # serves files under -L first: a 2-core Neoverse-N1-like one
  mkdir -p "$ROOT/sysroot/proc"
  for c in 0 1; do
    printf 'processor\t: %s\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$c"
  done > "$ROOT/sysroot/proc/cpuinfo"
fi
if [ ! -d "$ROOT/site/onnxruntime" ]; then
  mkdir -p "$ROOT/wheels" "$ROOT/site"
  .venv/bin/pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp "numpy<2.3" \
    "onnxruntime==$ORT_VERSION" -d "$ROOT/wheels" || skip "aarch64 wheels not downloadable"
  for w in "$ROOT"/wheels/*.whl; do (cd "$ROOT/site" && unzip -q -o "../wheels/$(basename "$w")"); done
fi
bash scripts/cross_aarch64.sh
.venv/bin/python -m scripts.aarch64_cases gen "$ROOT/cases"
PYTHONPATH="$ROOT/site" qemu-aarch64 -L "$ROOT/sysroot" "$ROOT/sysroot/usr/bin/python3.11" \
  scripts/aarch64_cases.py run build/aarch64/libqcompiler_ops.so "$ROOT/cases"
