"""`--offload-weights`: the model's fp32 weights live in a file-backed shared mapping instead of anonymous memory.

`load_offloaded` builds the model without allocating its weights (transformers' `no_init_weights`: `torch.empty`
pages are never touched), then streams the checkpoint's safetensors tensor by tensor into a temporary file mapped
with `MAP_SHARED` (`torch.from_file(shared=True)`), each parameter a view of it. Nothing else changes: quantization,
export, passes and validation read and write the weights as before, but the pages belong to a file: the kernel pages
in the decoder layer being used and writes dirty pages back and drops them under memory pressure, so what must fit
in memory is about one decoder layer, the activations and what is not a weight (embeddings in use, ONNX Runtime's
validation session), not the fp32 model. Peak RSS still counts the file pages while memory is plentiful; the
anonymous high-water mark (`peak_anon_gb`) is what the mapping saves. Model-sized copies made after loading
(AffineQuant's full-precision parameters and transformed weights, the full-precision model it exports) go to
unlinked spill stores next to the weights (`spill_store`, `keep`, `copy_model`), and so do the quantized layers as
each is made (`keep_arrays`). Before the export, `export_layout` transposes the linear weights in place in the store
(the layout ONNX's MatMul reads), so the per-layer export refers to the store's bytes instead of copying them.

Sources: local HF folders with safetensors weights (`model.safetensors` or a sharded index) and local GGUF files
(dequantized one tensor at a time, converted and named as transformers' GGUF loader does). Hub ids need a download:
a one-line error.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

import torch

from qcompiler import QCompilerError

log = logging.getLogger(__name__)

ALIGN = 16  # elements: each tensor starts on a 64-byte boundary of the store
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class WeightStore:
    """fp32 tensors carved from one temporary file mapped `MAP_SHARED` (removed when the store is released).
    `unlinked`: the file is removed as soon as it is mapped (no name; its space is freed when the last view of it
    is), for copies whose lifetime follows their tensors, not the store."""

    def __init__(self, numel: int, *, folder: Optional[str] = None, unlinked: bool = False):
        self.folder = folder
        total = max(int(numel), 1)
        if unlinked:
            fd, self.path = tempfile.mkstemp(prefix="qcompiler-weights-", suffix=".f32", dir=folder)
            os.close(fd)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="qcompiler-weights-", dir=folder)
            self.path = os.path.join(self._tmp.name, "weights.f32")
        try:
            with open(self.path, "wb") as f:
                f.truncate(total * 4)  # sparse: disk blocks are allocated as pages are written
            self.flat = torch.from_file(self.path, shared=True, size=total, dtype=torch.float32)
        finally:
            if unlinked:
                os.unlink(self.path)
        self.used = 0

    def take(self, shape: torch.Size) -> torch.Tensor:
        n = int(torch.Size(shape).numel())
        if self.used + n > self.flat.numel():
            raise RuntimeError(f"weight store full: {self.used} + {n} > {self.flat.numel()} elements")
        view = self.flat[self.used:self.used + n].view(shape)
        self.used += -(-n // ALIGN) * ALIGN
        return view


def store_numel(tensors) -> int:
    """Elements a `WeightStore` needs for `tensors` (each aligned)."""
    return sum(-(-t.numel() // ALIGN) * ALIGN for t in tensors)


def spill_store(model, numel: int) -> Optional[WeightStore]:
    """For an offloaded model (`load_offloaded`), a new unlinked store of `numel` elements next to its weights, for
    the model-sized copies a method or the export keeps (AffineQuant's full-precision state); None otherwise."""
    store = getattr(model, "qcompiler_store", None)
    return None if store is None else WeightStore(numel, folder=store.folder, unlinked=True)


def keep(store: Optional[WeightStore], t: torch.Tensor) -> torch.Tensor:
    """A detached fp32 copy of `t`: in `store` (file pages) when given, else in memory."""
    if store is None:
        return t.detach().clone()
    view = store.take(t.shape)
    view.copy_(t.detach())
    return view


def copy_model(model):
    """`copy.deepcopy(model)`; for an offloaded model the copy's parameters are file pages of a spill store and the
    weight store itself is shared, not copied."""
    import copy

    store = getattr(model, "qcompiler_store", None)
    if store is None:
        return copy.deepcopy(model)
    params = dict(model.named_parameters())
    spill = spill_store(model, store_numel(params.values()))
    memo = {id(store): store}
    for p in params.values():
        memo[id(p)] = torch.nn.Parameter(keep(spill, p), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def keep_arrays(model, obj):
    """For an offloaded model (`load_offloaded`), dataclass `obj` (a quantized layer, `SpQRWeight`) with its NumPy
    arrays moved to file pages: one unlinked file next to the weights, mapped copy-on-write (reading pages in from
    the file; a write makes a private copy, the file never changes). The compressed layers grow with the model
    (≈ 0.53 bytes per parameter at 4 bits, group 128: 3.7 GB for an 8B model) and live until the export is written,
    so they must not stay in anonymous memory. Without offload, `obj` itself."""
    import dataclasses
    import mmap

    import numpy as np

    store = getattr(model, "qcompiler_store", None)
    if store is None:
        return obj
    arrays = {f.name: v for f in dataclasses.fields(obj)
              if isinstance(v := getattr(obj, f.name), np.ndarray) and v.nbytes}
    if not arrays:
        return obj
    fd, path = tempfile.mkstemp(prefix="qcompiler-layer-", suffix=".bin", dir=store.folder)
    try:
        with os.fdopen(fd, "wb+") as f:
            offsets = {}
            for name, v in arrays.items():
                f.seek(-(-f.tell() // 64) * 64)
                offsets[name] = f.tell()
                f.write(np.ascontiguousarray(v).tobytes())
            f.flush()
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    finally:
        os.unlink(path)
    return dataclasses.replace(obj, **{name: np.frombuffer(mapped, dtype=v.dtype, count=v.size,
                                                           offset=offsets[name]).reshape(v.shape)
                                       for name, v in arrays.items()})


def file_range(model, array) -> Optional[tuple[str, int]]:
    """`(path, byte offset)` of C-contiguous NumPy `array` inside offloaded `model`'s weight store file, or None (not
    offloaded, or the array is not a contiguous range of the store): an export can point at those bytes instead of
    copying them."""
    store = getattr(model, "qcompiler_store", None)
    if store is None or not array.flags.c_contiguous or not os.path.exists(store.path):
        return None
    base = store.flat.data_ptr()
    addr = array.__array_interface__["data"][0]
    if base <= addr and addr + array.nbytes <= base + store.flat.numel() * store.flat.element_size():
        return store.path, addr - base
    return None


def export_layout(model) -> int:
    """Lay an offloaded model's linear weights out in its store as the ONNX exporter stores them, transposed
    (`[in, out]`, MatMul's right operand), each Parameter becoming the `[out, in]` transposed view of its own bytes.
    Values do not change, and the per-layer export (`qcompiler.graph.stamp`) then refers to the store's bytes instead
    of copying every decoder weight into its own file (28 GB for Llama-3-8B). Run after quantization (a transposed
    weight changes summation orders in PyTorch's matmuls, not results beyond rounding). Weights shared by several
    modules (tied embeddings) keep their layout. Returns how many weights were laid out; 0 without offload."""
    store = getattr(model, "qcompiler_store", None)
    if store is None:
        return 0
    users: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        users[id(p)] = users.get(id(p), 0) + 1
    n = 0
    with torch.no_grad():
        for module in model.modules():
            p = getattr(module, "weight", None)
            if (not isinstance(module, torch.nn.Linear) or p is None or p.dim() != 2 or users.get(id(p)) != 1
                    or not p.is_contiguous() or file_range(model, p.detach().numpy()) is None):
                continue
            out_f, in_f = p.shape
            value = p.detach().clone()
            p.data = p.data.view(-1).view(in_f, out_f).t()  # the same bytes, read [in, out]
            p.data.copy_(value)
            del value
            n += 1
    return n


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """tensor name → safetensors file."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    raise QCompilerError(f"--offload-weights needs safetensors weights ({SINGLE_FILE} or {INDEX_FILE}) in {folder}")


def _checkpoint_key(name: str, keys) -> Optional[str]:
    """The checkpoint key of parameter `name` (checkpoints saved from the base model lack the `model.` prefix)."""
    for key in (name, name.removeprefix("model."), f"model.{name}"):
        if key in keys:
            return key
    return None


# A source: its tensors by checkpoint key, each read on demand (`read(key)` → a CPU tensor), and which parameter a
# key fills (`key_of(parameter names sharing one tensor)` → key or None).
class _Safetensors:
    """A local HF folder's `model.safetensors` or sharded index: tensors read one at a time with `safe_open`."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack):
        from safetensors import safe_open

        self.files = _checkpoint_files(folder)
        self._open = {path: stack.enter_context(safe_open(str(path), framework="pt"))
                      for path in dict.fromkeys(self.files.values())}

    def key_of(self, aliases: list[str]) -> Optional[str]:
        return next((k for alias in aliases if (k := _checkpoint_key(alias, self.files)) is not None), None)

    def read(self, key: str) -> torch.Tensor:
        return self._open[self.files[key]].get_tensor(key)


class _Gguf:
    """A GGUF file, memory-mapped by gguf's reader; each tensor dequantized (`gguf.dequantize`) and converted
    (`TENSOR_PROCESSORS`: LLaMA's q/k row order) on its own, with transformers' name mapping — the steps of
    transformers' `load_gguf_checkpoint`, which instead keeps every dequantized tensor of the model in memory."""

    def __init__(self, path: Path, model):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, read_field)

        reader = GGUFReader(str(path))
        architecture = read_field(reader, "general.architecture")[0]
        # the processors read head counts under transformers' names: the config already parsed from this file
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
        hf_of = get_gguf_hf_weights_map(model, self.processor)  # GGUF name → parameter name
        self.tensors = {hf_of[t.name]: t for t in reader.tensors if t.name in hf_of}

    def key_of(self, aliases: list[str]) -> Optional[str]:
        return next((a for a in aliases if a in self.tensors), None)

    def read(self, key: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        t = self.tensors[key]
        out = self.processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                     tensor_key_mapping={}, parsed_parameters={"tensors": {}})
        if out.name != t.name:
            raise QCompilerError(f"--offload-weights cannot convert GGUF tensor {t.name} (renamed to {out.name} "
                                 "by transformers' loader): export without --offload-weights")
        return torch.from_numpy(np.copy(out.weights))  # one tensor; the memory map stays read-only


def load_offloaded(source: str, *, store_dir: Optional[str] = None, progress: bool = True) -> tuple[Any, Any]:
    """`(model, tokenizer)` with the weights in a `WeightStore` (kept alive by the model: `model.qcompiler_store`).
    `source`: a local HF folder with safetensors weights, or a local GGUF file (or a folder holding exactly one)."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    from qcompiler.models.loading import ATTN_IMPLEMENTATION, gguf_config, resolve_source
    from qcompiler.models.preflight import check_finite_weight, check_loaded_weights

    where, kwargs = resolve_source(source)  # a missing local path: one-line error
    if not Path(where).is_dir():
        raise QCompilerError(f"--offload-weights needs a local HF folder with safetensors weights or a local GGUF "
                             f"file (got {source}: hub ids are downloaded and loaded whole)")
    gguf_file = kwargs.get("gguf_file")
    config = gguf_config(where, gguf_file) if gguf_file else AutoConfig.from_pretrained(where, **kwargs)
    config._attn_implementation = ATTN_IMPLEMENTATION
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # from_config under no_init_weights leaves tied embeddings as two tensors
    model.eval()
    params = dict(model.named_parameters())  # tied weights once
    aliases: dict[int, list[str]] = {}  # a tied weight may be saved under any of its names (safetensors keeps one)
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    with contextlib.ExitStack() as stack:
        checkpoint = (_Gguf(Path(where) / gguf_file, model) if gguf_file
                      else _Safetensors(Path(where), stack))
        plan = {name: checkpoint.key_of(aliases[id(p)]) for name, p in params.items()}
        missing = [name for name, key in plan.items() if key is None]
        if missing:
            check_loaded_weights(model, missing)  # raises: the checkpoint lacks weights the model needs
        store = WeightStore(store_numel(params.values()), folder=store_dir)
        with torch.no_grad():
            for name, key in tqdm(plan.items(), desc="loading into the weight store", unit="tensor",
                                  disable=not progress):
                p = params[name]
                t = checkpoint.read(key)
                if tuple(t.shape) != tuple(p.shape):
                    raise QCompilerError(f"checkpoint tensor {key} has shape {tuple(t.shape)}, the model's "
                                         f"{name} {tuple(p.shape)}")
                check_finite_weight(name, t)
                view = store.take(p.shape)
                view.copy_(t)
                del t
                p.data = view  # every module holding this Parameter (tied weights) now reads the store
    model.qcompiler_store = store
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    log.info("loaded %s into the weight store %s (%.2f GB)", source, store.path, store.flat.numel() * 4 / 1e9)
    return model, tokenizer


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc `malloc_trim`; a no-op elsewhere). Tensors under glibc's
    mmap threshold (up to 32 MB) are freed into the heap and kept there: called after each decoder layer, the
    resident memory stays at one layer's worth instead of creeping up with fragmentation (AffineQuant, 16-layer
    0.98 GB model: 1.29 GB anonymous at the last layer without, 0.49 GB with)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def anon_rss_gb() -> Optional[float]:
    """This process's resident anonymous memory now, in GB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


class AnonPeak:
    """Samples `anon_rss_gb` every `interval` s in a background thread; `peak` is the highest value seen."""

    def __init__(self, interval: float = 0.05):
        self.peak = anon_rss_gb() or 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, anon_rss_gb() or 0.0)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss_gb() or 0.0)
        return self.peak
