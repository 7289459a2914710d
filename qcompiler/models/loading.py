"""Loading a causal LM and its tokenizer from a local HF folder, a local GGUF file, or a hub id.

GGUF files are dequantized to `dtype` by transformers (needs the `gguf` package). Models are loaded with eager
attention: it exports cleanly with `torch.onnx.export(dynamo=True)` and matches ONNX Runtime most closely.
"""

from __future__ import annotations

import contextlib
import functools

import logging
import os
from pathlib import Path
from typing import Any

import torch

from qcompiler import QCompilerError

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "eager"
GGUF_SUFFIX = ".gguf"


def _looks_like_path(source: str) -> bool:
    """True if `source` cannot be a hub id ("org/name" or "name") and must be a local path."""
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or source.lower().endswith((GGUF_SUFFIX, ".json", ".safetensors", ".bin"))
    )


def complete_gguf_config(config: Any, path: str | os.PathLike) -> Any:
    """`config` as transformers read it from GGUF file `path`, plus what llama.cpp's converter stored and
    transformers' GGUF loader leaves out (it reads a fixed list of keys per architecture and takes the config class
    defaults for the rest), where that changes the model:

    - `{arch}.rope.dimension_count` below the head size: partial rotary (Phi-4-mini rotates 3/4 of each head);
    - `rope_factors_long` / `rope_factors_short` tensors with `{arch}.rope.scaling.original_context_length` (and
      `.attn_factor`): longrope (Phi-3.5-mini, Phi-4-mini);
    - `{arch}.attn_logit_softcapping`, `{arch}.final_logit_softcapping` (Gemma 2).

    Keyed by the metadata present, not by architecture; returns a new config when anything was added."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else ""

    def value(key: str):
        f = reader.fields.get(f"{arch}.{key}")
        return None if f is None else f.contents()

    d = config.to_dict()
    rope = dict(d.get("rope_parameters") or {})
    added: list[str] = []
    heads = d.get("num_attention_heads") or 1
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    n_rot = value("rope.dimension_count")
    if n_rot and n_rot < head_dim and "partial_rotary_factor" in rope:
        rope["partial_rotary_factor"] = n_rot / head_dim
        added.append(f"partial rotary {n_rot}/{head_dim}")
    factors = {t.name: t for t in reader.tensors if t.name.startswith("rope_factors_")}
    original = value("rope.scaling.original_context_length")
    if {"rope_factors_long.weight", "rope_factors_short.weight"} <= set(factors) and original:
        rope.update(rope_type="longrope",
                    long_factor=[float(x) for x in factors["rope_factors_long.weight"].data],
                    short_factor=[float(x) for x in factors["rope_factors_short.weight"].data],
                    original_max_position_embeddings=int(original))
        if value("rope.scaling.attn_factor") is not None:
            rope["attention_factor"] = float(value("rope.scaling.attn_factor"))
        if "original_max_position_embeddings" in d:
            d["original_max_position_embeddings"] = int(original)
        added.append(f"longrope (original context {original})")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        v = value(key)
        if v is not None and key in d and d[key] != v:
            d[key] = float(v)
            added.append(f"{key} {v:g}")
    if not added:
        return config
    log.info("%s: from the GGUF metadata transformers does not read: %s", Path(path).name, ", ".join(added))
    d["rope_parameters"] = rope
    return type(config).from_dict(d)


def gguf_config(where: str, gguf_file: str) -> Any:
    """The config of GGUF file `where/gguf_file` as transformers reads it, completed by `complete_gguf_config`."""
    from transformers import AutoConfig

    return complete_gguf_config(AutoConfig.from_pretrained(where, gguf_file=gguf_file), Path(where) / gguf_file)


def _from_pretrained(source: str, dtype: torch.dtype, **kwargs: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qcompiler.models.preflight import check_loaded_weights

    from transformers.utils import logging as hf_logging

    # transformers' multi-line load report is replaced by check_loaded_weights' one-line error on missing weights
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        extra = {"config": gguf_config(source, kwargs["gguf_file"])} if "gguf_file" in kwargs else {}
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, output_loading_info=True, **kwargs, **extra
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    check_loaded_weights(model, info.get("missing_keys", ()))
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model, tokenizer


def resolve_source(source: str) -> tuple[str, dict[str, Any]]:
    """Map `source` to `(path_or_hub_id, from_pretrained kwargs)`; raises QCompilerError for bad local paths."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), {}
        ggufs = sorted(path.glob(f"*{GGUF_SUFFIX}"))
        if len(ggufs) != 1:
            what = "no config.json and no .gguf file" if not ggufs else f"{len(ggufs)} .gguf files"
            raise QCompilerError(f"not a model folder ({what}): {source}")
        return str(path), {"gguf_file": ggufs[0].name}
    if path.is_file():
        if path.suffix.lower() != GGUF_SUFFIX:
            raise QCompilerError(f"not a model: {source} (expected a folder with config.json or a .gguf file)")
        return str(path.parent), {"gguf_file": path.name}
    if _looks_like_path(source):
        raise QCompilerError(f"model path not found: {source}")
    return source, {}


def _load(source: str, loader):
    """Run `loader(path_or_id, **kwargs)` with every load failure turned into one-line QCompilerError."""
    source = str(source)
    where, kwargs = resolve_source(source)
    try:
        return loader(where, **kwargs)
    except QCompilerError:
        raise
    except Exception as e:  # noqa: BLE001 - network, auth, bad files: all reported on one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if where == source and not kwargs and not Path(source).exists():
            raise QCompilerError(
                f"could not load model '{source}': not a local folder/GGUF file and the hub is unreachable "
                f"({type(e).__name__}: {first[:200]})"
            ) from e
        raise QCompilerError(f"could not load model '{source}': {first[:300]}") from e


def load_config(source: str) -> Any:
    """The model's `PretrainedConfig` only (no weights): checks the architecture before a long load. A GGUF file's
    config is completed by `complete_gguf_config`."""
    from transformers import AutoConfig

    def config(where: str, **kw: Any) -> Any:
        return gguf_config(where, kw["gguf_file"]) if "gguf_file" in kw else AutoConfig.from_pretrained(where, **kw)

    return _load(source, config)


@contextlib.contextmanager
def _gguf_progress(enabled: bool):
    """transformers' GGUF conversion draws its own tqdm bar (it ignores `disable_progress_bar`): off when quiet."""
    if enabled:
        yield
        return
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_model(source: str, *, dtype: torch.dtype = torch.float32, progress: bool = True
               ) -> tuple[torch.nn.Module, Any]:
    """Load `(model, tokenizer)` from `source`, in eval mode with weights in `dtype`.

    `source` is, in this order: a local folder with `config.json` (HF layout); a local `.gguf` file (or a folder
    holding exactly one); otherwise a hub id. Raises QCompilerError for a missing local path, a folder that holds no
    model, or a hub id that cannot be fetched. `progress=False` hides the GGUF conversion bar.
    """
    with _gguf_progress(progress):
        model, tokenizer = _load(str(source), lambda where, **kw: _from_pretrained(where, dtype, **kw))
    model.eval()
    log.info("loaded %s: %s, %s", source, type(model).__name__, dtype)
    return model, tokenizer


def save_pretrained_safe(model: torch.nn.Module, tokenizer: Any, out_dir: str | os.PathLike, *,
                         weights: bool = False) -> Path:
    """Write the tokenizer files to `out_dir` (created if needed); with `weights=True` also `config.json` and
    `model.safetensors` (works for GGUF-loaded models, whose `save_pretrained` fails in transformers 5; tied
    weights are stored once). Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    if weights:
        from safetensors.torch import save_model

        model.config.save_pretrained(str(out))
        save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
        if getattr(model, "generation_config", None) is not None:
            try:
                model.generation_config.save_pretrained(str(out))
            except Exception:  # noqa: BLE001 - optional file
                pass
    return out
