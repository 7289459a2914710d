"""Run a `qcompiler export` folder with nothing but onnxruntime, numpy and tokenizers (no qcompiler import).

What a deployment needs from OUT: model.onnx (+ model.onnx.data), tokenizer.json, and libqcompiler_ops.so (the
SpQRMatMul kernels; without it ONNX Runtime falls back to the standard-op definition carried in the model: correct,
slow to load, fp32 memory). Greedy decoding with a KV cache:

    python examples/deploy_python.py OUT --prompt "The capital of France is" --max-new-tokens 32
    python examples/deploy_python.py OUT --ids 1,2,3 --max-new-tokens 8      # token ids in, token ids out

`pip install onnxruntime numpy tokenizers` (or onnxruntime-gpu, with --provider cuda) is all it takes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnxruntime as ort

LIBRARY = "libqcompiler_ops.so"


def open_session(folder: str, provider: str, use_library: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    lib = os.path.join(folder, LIBRARY)
    if use_library and os.path.exists(lib):
        opts.register_custom_ops_library(lib)
    else:
        print(f"note: running without {LIBRARY} (portable fallback: slow to load, fp32 weights in memory)",
              file=sys.stderr)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(os.path.join(folder, "model.onnx"), opts, providers=providers)


class Decoder:
    """Greedy decoding over the exported graph: input_ids, attention_mask, position_ids, past_key_values.{i}.key/value
    → logits, present.{i}.key/value."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self.past = [n for n in inputs if n.startswith("past_key_values.")]
        _, heads, _, head_dim = inputs[self.past[0]].shape  # [batch, kv heads, past length, head dim]
        dtype = np.float16 if "float16" in inputs[self.past[0]].type else np.float32
        self.empty = np.zeros((1, heads, 0, head_dim), dtype)
        self.wants_positions = "position_ids" in inputs
        self.outputs = ["logits"] + [n.replace("past_key_values.", "present.") for n in self.past]

    def _run(self, ids: list[int], past: list[np.ndarray], start: int) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": np.asarray([ids], np.int64),
                 "attention_mask": np.ones((1, start + len(ids)), np.int64)}
        if self.wants_positions:
            feeds["position_ids"] = np.arange(start, start + len(ids), dtype=np.int64)[None]
        feeds.update(zip(self.past, past))
        logits, *present = self.session.run(self.outputs, feeds)
        return logits[0, -1], present

    def greedy(self, prompt: list[int], max_new_tokens: int, eos: int | None) -> tuple[list[int], float, float]:
        t = time.perf_counter()
        logits, past = self._run(prompt, [self.empty] * len(self.past), 0)
        prefill = time.perf_counter() - t
        tokens = [int(np.argmax(logits))]
        t = time.perf_counter()
        while len(tokens) < max_new_tokens and tokens[-1] != eos:
            logits, past = self._run(tokens[-1:], past, len(prompt) + len(tokens) - 1)
            tokens.append(int(np.argmax(logits)))
        return tokens, prefill, time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a `qcompiler export` output folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenized with OUT/tokenizer.json)")
    src.add_argument("--ids", help="comma-separated prompt token ids (prints generated ids)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-library", action="store_true", help="do not register the op library (fallback)")
    args = p.parse_args(argv)

    decoder = Decoder(open_session(args.folder, args.provider, not args.no_library))
    tokenizer, eos = None, None
    if args.prompt is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(os.path.join(args.folder, "tokenizer.json"))
        prompt = tokenizer.encode(args.prompt).ids
        eos_text = _eos_token(args.folder)
        eos = tokenizer.token_to_id(eos_text) if eos_text else None
    else:
        prompt = [int(t) for t in args.ids.split(",")]
    tokens, prefill, decode = decoder.greedy(prompt, args.max_new_tokens, eos)
    if tokenizer is not None:
        print(args.prompt + tokenizer.decode(tokens, skip_special_tokens=True))
    else:
        print(",".join(map(str, tokens)))
    print(f"prefill {len(prompt) / prefill:.1f} tok/s, decode {(len(tokens) - 1) / decode if len(tokens) > 1 else 0:.1f} "
          "tok/s", file=sys.stderr)
    return 0


def _eos_token(folder: str) -> str | None:
    import json

    try:
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError):
        return None
    return eos.get("content") if isinstance(eos, dict) else eos


if __name__ == "__main__":
    sys.exit(main())
