"""genai_config.json: what onnxruntime-genai needs to load an exported folder unmodified.

The decoder's inputs/outputs are this exporter's (input_ids, attention_mask, position_ids,
past_key_values.{i}.key/value → logits, present.{i}.key/value); `session_options.custom_ops_library` names the op
library copied into the folder. With fused attention (GroupQueryAttention, the default export) past and present
share one buffer of `max_length` per tensor (`past_present_share_buffer`); a standard-op graph (`--no-contrib-ops`)
returns the past concatenated with the new step, so there it is false. Search defaults come from the model's generation config when it
has one (greedy otherwise).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from qcompiler.folder import LIBRARY_FILE, MODEL_FILE
from qcompiler.models.families import Family

log = logging.getLogger("qcompiler")

GENAI_CONFIG_FILE = "genai_config.json"


def genai_config(hf_config: Any, family: Family, kv: dict, *, generation_config: Any = None,
                 library: Optional[str] = LIBRARY_FILE, dtype: str = "float32", tokenizer: Any = None,
                 shared_buffer: bool = False) -> Optional[dict]:
    """The genai_config.json content for an export of a `family` model, or None if onnxruntime-genai has no model
    type for the family (OPT) or no end-of-sequence token can be found (onnxruntime-genai needs one).

    Special tokens come from the generation config and the model config, then the tokenizer (configs such as Qwen3's
    may leave them unset); a BOS found nowhere is 1, as onnxruntime-genai's own model builder writes."""
    if family.genai_type is None:
        return None
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    gen = generation_config

    def pick(name: str, default):
        value = getattr(gen, name, None) if gen is not None else None
        return default if value is None else value

    def from_tokenizer(name: str, value):
        return getattr(tokenizer, name, None) if value is None and tokenizer is not None else value

    eos = from_tokenizer("eos_token_id", pick("eos_token_id", getattr(text, "eos_token_id", None)))
    if eos is None:
        log.warning("no genai_config.json: the model config, generation config and tokenizer name no "
                    "end-of-sequence token")
        return None
    bos = from_tokenizer("bos_token_id", getattr(text, "bos_token_id", None))
    bos = 1 if bos is None else bos
    pad = getattr(text, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    sample = bool(pick("do_sample", False))
    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if library:
        session_options["custom_ops_library"] = library
    context = int(getattr(text, "max_position_embeddings", 2048))
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": session_options,
                "filename": MODEL_FILE,
                "head_size": kv["head_dim"],
                "hidden_size": text.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": text.num_attention_heads,
                "num_hidden_layers": kv["num_layers"],
                "num_key_value_heads": kv["num_kv_heads"],
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": family.genai_type,
            "vocab_size": text.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": sample,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": bool(shared_buffer),
            "repetition_penalty": float(pick("repetition_penalty", 1.0)),
            "temperature": float(pick("temperature", 1.0)),
            "top_k": int(pick("top_k", 1) or 1) if sample else 1,
            "top_p": float(pick("top_p", 1.0)),
        },
    }
