"""Text generation from an exported folder through ONNX Runtime with the op library: KV-cache decode, greedy or
sampled (temperature / top-k / top-p), tokens streamed as they come, prefill and decode speed measured.

Needs only the folder (model.onnx, quant_config.json for the KV layout, the tokenizer files) and the op library.

The KV cache: a graph with fused attention (`com.microsoft::GroupQueryAttention`, the default export) gets one buffer
per layer's key and value, sized for the prompt plus the new tokens and bound as both past and present
(`past_present_share_buffer`, as onnxruntime-genai runs it): each step writes its keys in place. A standard-op graph
(`--no-contrib-ops`) returns new presents each step (the past concatenated with the step), fed back as the next past.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from qcompiler import QCompilerError
from qcompiler.folder import CONFIG_FILE, MODEL_FILE

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the next token is chosen.

    Attributes:
        temperature: 0 → greedy (argmax); > 0 → sample from softmax(logits / temperature).
        top_k: keep the k most likely tokens before sampling (0: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches p (1.0: all).
        seed: random seed of the sampler.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise QCompilerError(f"--temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise QCompilerError(f"--top-k must be ≥ 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise QCompilerError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class GenerationResult:
    """Output of `Generator.generate`.

    Attributes:
        prompt_ids: the tokenized prompt.
        token_ids: the generated tokens (without the prompt; the end-of-sequence token included if it stopped there).
        text: the generated text.
        prefill_s: time of the prompt forward; decode_s: time of the one-token steps after it.
        stopped_at_eos: generation ended on the end-of-sequence token.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    prefill_s: float
    decode_s: float
    stopped_at_eos: bool

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.token_ids) - 1  # the first token comes from the prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def pick_token(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """Next token from one row of logits [V] under `cfg`."""
    if cfg.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    order = np.argsort(-z, kind="stable")
    if cfg.top_k:
        order = order[: cfg.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if cfg.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), cfg.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


class Generator:
    """An exported folder loaded for generation.

    Args:
        folder: output of `qcompiler export`.
        provider: "cpu" or "cuda" (ONNX Runtime execution provider).
        threads: ONNX Runtime intra-op threads (None: ORT's default).
    """

    def __init__(self, folder: str | Path, *, provider: str = "cpu", threads: Optional[int] = None):
        import onnxruntime as ort

        from qcompiler.runtime.ops import session

        self.folder = Path(folder)
        for name in (MODEL_FILE, CONFIG_FILE):
            if not (self.folder / name).is_file():
                raise QCompilerError(f"{self.folder} has no {name}: not a `qcompiler export` output folder")
        if provider not in PROVIDERS:
            raise QCompilerError(f"--provider must be one of {', '.join(PROVIDERS)}, got {provider}")
        if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise QCompilerError("--provider cuda: this onnxruntime has no CUDAExecutionProvider "
                                 "(install onnxruntime-gpu)")
        record = json.loads((self.folder / CONFIG_FILE).read_text())
        kv = record["kv"]
        self.num_layers, self.num_kv_heads, self.head_dim = kv["num_layers"], kv["num_kv_heads"], kv["head_dim"]
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = session(str(self.folder / MODEL_FILE), providers=PROVIDERS[provider], sess_options=so)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        missing = [n for n in ("input_ids", *self.past_names) if n not in inputs]
        if missing:
            raise QCompilerError(f"{self.folder / MODEL_FILE} lacks decoder inputs: {', '.join(missing[:3])}")
        self.input_names = set(inputs)
        self.past_dtype = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.provider = provider
        self.threads = threads
        #: past and present bound to one buffer per tensor (graphs whose attention is GroupQueryAttention)
        self.shared_buffer = "GroupQueryAttention" in (record.get("contrib_ops") or [])
        self.accuracy_level = int(record.get("accuracy_level") or 0)
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        except Exception as e:  # noqa: BLE001 - any tokenizer loading failure is one clear error
            raise QCompilerError(f"cannot load the tokenizer from {self.folder}: {e}") from e
        # one warm-up step: kernels pack their weights on their first call, which is load time, not prefill time
        empty = self.empty_past()
        self.session.run(self.output_names[:1], self._feeds(np.zeros((1, 1), np.int64), empty, 0))

    def empty_past(self) -> list[np.ndarray]:
        """An empty KV cache (batch 1, length 0), one array per `past_names` entry."""
        return [np.zeros((1, self.num_kv_heads, 0, self.head_dim), self.past_dtype) for _ in self.past_names]

    def _feeds(self, ids: np.ndarray, past: list[np.ndarray], past_len: int) -> dict:
        S = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, past_len + S), np.int64),
                 "position_ids": np.arange(past_len, past_len + S, dtype=np.int64)[None, :],
                 **dict(zip(self.past_names, past))}
        return {k: v for k, v in feeds.items() if k in self.input_names}

    def describe(self) -> str:
        """The runtime settings, one line (what `qcompiler generate` prints)."""
        kv = ("one shared key/value buffer per layer, sized prompt + new tokens (GroupQueryAttention)"
              if self.shared_buffer else "presents concatenated each step (standard-op attention)")
        threads = self.threads or "ONNX Runtime's default"
        activations = ("int8 on CPUs with AVX512-VNNI or AVX2 (accuracy level 4)" if self.accuracy_level
                       else "fp32 (accuracy level 0)")
        return (f"KV cache: {kv}; SpQRMatMul activations: {activations}; provider {self.provider}; "
                f"intra-op threads: {threads}")

    def encode(self, prompt: str, *, chat: bool = False) -> list[int]:
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise QCompilerError(f"--chat: the tokenizer in {self.folder} has no chat template")
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                           add_generation_prompt=True, tokenize=True))
        ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids:
            raise QCompilerError("the prompt is empty after tokenization")
        return ids

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int = 64,
                 sampling: SamplingConfig = SamplingConfig(), stop_at_eos: bool = True,
                 on_text: Optional[Callable[[str], None]] = None) -> GenerationResult:
        """Generate up to `max_new_tokens` after `prompt_ids`; `on_text` receives the text as it grows (each call
        gets the new part)."""
        if max_new_tokens < 1:
            raise QCompilerError(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}")
        rng = np.random.default_rng(sampling.seed)
        eos = self.tokenizer.eos_token_id
        step = (_SharedBuffer(self, len(prompt_ids) + max_new_tokens) if self.shared_buffer else _Concatenated(self))
        ids = np.asarray([prompt_ids], dtype=np.int64)
        t = time.perf_counter()
        logits = step(ids, 0)
        prefill_s = time.perf_counter() - t
        tokens: list[int] = []
        shown = ""
        past_len = len(prompt_ids)
        t = time.perf_counter()
        while True:
            tokens.append(pick_token(logits[0, -1], sampling, rng))
            if on_text is not None:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if text.startswith(shown) and len(text) > len(shown) and not text.endswith("\ufffd"):
                    on_text(text[len(shown):])
                    shown = text
            if len(tokens) >= max_new_tokens or (stop_at_eos and eos is not None and tokens[-1] == eos):
                break
            logits = step(np.asarray([[tokens[-1]]], dtype=np.int64), past_len)
            past_len += 1
        decode_s = time.perf_counter() - t
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if on_text is not None and text.startswith(shown) and len(text) > len(shown):
            on_text(text[len(shown):])
        return GenerationResult(prompt_ids=list(prompt_ids), token_ids=tokens, text=text, prefill_s=prefill_s,
                                decode_s=decode_s,
                                stopped_at_eos=bool(stop_at_eos and eos is not None and tokens[-1] == eos))


class _Concatenated:
    """Decode steps that feed each step's presents back as the next past."""

    def __init__(self, gen: Generator):
        self.gen = gen
        self.past = gen.empty_past()

    def __call__(self, ids: np.ndarray, past_len: int) -> np.ndarray:
        out = self.gen.session.run(self.gen.output_names, self.gen._feeds(ids, self.past, past_len))
        self.past = list(out[1:])
        return out[0]


class _SharedBuffer:
    """Decode steps over one preallocated buffer per past/present pair (IOBinding: the same OrtValue bound as the
    input `past_key_values.*` and the output `present.*`; GroupQueryAttention writes the step's keys in place).

    Bound once: the presents, and for the one-token steps the logits and the step's input_ids / position_ids (arrays
    the binding reads in place, rewritten each step); only the attention mask (one longer each step) is bound anew.
    The logits a one-token step returns are overwritten by the next step."""

    def __init__(self, gen: Generator, capacity: int):
        import onnxruntime as ort

        self.ort = ort
        self.gen = gen
        device = "cuda" if gen.provider == "cuda" else "cpu"
        shape = (1, gen.num_kv_heads, capacity, gen.head_dim)
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, gen.past_dtype), device, 0)
                        for _ in gen.past_names]
        self.binding = gen.session.io_binding()
        for past, buffer in zip(gen.past_names, self.buffers):
            self.binding.bind_ortvalue_input(past, buffer)
        # the logits first (get_outputs() follows the binding order): unallocated until the first one-token step
        self.binding.bind_output(gen.output_names[0], "cpu")
        for present, buffer in zip(gen.present_names, self.buffers):
            self.binding.bind_ortvalue_output(present, buffer)
        self.mask = np.ones((1, capacity), np.int64)
        self.token = np.zeros((1, 1), np.int64)  # this step's input_ids and position_ids, read in place
        self.position = np.zeros((1, 1), np.int64)
        self.logits: Optional[np.ndarray] = None  # the one-token steps' logits, (1, 1, vocab)

    def _bind_step_buffers(self, like: np.ndarray) -> None:
        ort, gen, binding = self.ort, self.gen, self.binding
        if self.logits is None or self.logits.shape[-1] != like.shape[-1] or self.logits.dtype != like.dtype:
            self.logits = np.zeros((1, 1, like.shape[-1]), like.dtype)
        binding.bind_ortvalue_output(gen.output_names[0], ort.OrtValue.ortvalue_from_numpy(self.logits))
        binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(self.token))
        if "position_ids" in gen.input_names:
            binding.bind_ortvalue_input("position_ids", ort.OrtValue.ortvalue_from_numpy(self.position))

    def __call__(self, ids: np.ndarray, past_len: int) -> np.ndarray:
        gen, binding = self.gen, self.binding
        S = ids.shape[1]
        if S > 1 or self.logits is None:  # the prompt (or a first single token): ORT allocates the logits
            binding.bind_output(gen.output_names[0], "cpu")
            for name, value in gen._feeds(ids, [], past_len).items():
                binding.bind_cpu_input(name, value)
            gen.session.run_with_iobinding(binding)
            logits = binding.get_outputs()[0].numpy()
            self._bind_step_buffers(logits)
            return logits
        self.token[0, 0] = ids[0, 0]
        self.position[0, 0] = past_len
        if "attention_mask" in gen.input_names:
            binding.bind_ortvalue_input("attention_mask", self.ort.OrtValue.ortvalue_from_numpy(
                self.mask[:, :past_len + 1]))
        gen.session.run_with_iobinding(binding)
        return self.logits
