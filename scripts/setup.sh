#!/usr/bin/env bash
# Create .venv and install qcompiler (builds the custom-op library in custom_ops/ through CMake) with the exact
# package set of constraints.txt (the versions CI last passed with; build-constraints.txt for the build backend).
# QCOMPILER_UNPINNED=1 installs the newest versions pyproject.toml allows instead (scripts/refresh_constraints.sh).
# torch is installed first from the CPU wheel (2.13.0, within the project's range), so pip pulls no CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q)
if [ "${QCOMPILER_UNPINNED:-0}" = 1 ]; then
  echo "setup: unpinned install (newest versions within pyproject.toml's ranges)"
  "${PIP[@]}" --upgrade pip
  echo "torch==2.13.0" > .venv/torch-pin.txt  # any other torch pulls GBs of CUDA wheels
  PIN=(--upgrade --upgrade-strategy eager -c .venv/torch-pin.txt)
else
  PIN=(-c constraints.txt --build-constraint build-constraints.txt)
  "${PIP[@]}" -c constraints.txt pip
fi
"${PIP[@]}" "${PIN[@]}" "torch==2.13.0"
"${PIP[@]}" "${PIN[@]}" -e ".[dev]"
# onnxruntime-genai (tests/test_genai.py): --no-deps, because its dependency on the CPU `onnxruntime` package would
# overwrite onnxruntime-gpu's files; it runs on the onnxruntime-gpu already installed (same ORT version line).
"${PIP[@]}" "${PIN[@]}" --no-deps "onnxruntime-genai>=0.18,<0.19"
.venv/bin/python -c "import qcompiler.runtime.ops as o; print('qcompiler ops library:', o.library_path())"
