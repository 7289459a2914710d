"""Checks that turn late, confusing failures of an export into early one-line errors.

- `estimate_memory` / `check_memory`: the export's peak resident memory, estimated from the config alone (parameters
  counted on the meta device), against what the machine has available: refused before loading anything.
- `check_loaded_weights`: a checkpoint that lacks weights the model needs (transformers would initialise them at
  random: an untied `lm_head` missing from a checkpoint is the common case) or holds NaN/Inf.
- `check_finite`: NaN/Inf in calibration activations (the layer whose input they are is named).
- `check_linear_sizes`: layer shapes the SpQRMatMul format cannot store with the chosen method.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Optional

import torch

from qcompiler import QCompilerError

GIB = 1024**3

# Peak resident memory of an export = a fixed base (Python, torch, ONNX Runtime) + a per-method multiple of the fp32
# parameter bytes + the calibration activations. The multiples are declared by each method class
# (`Method.memory_param_factor`, `memory_offload_param_factor`, `memory_activation_copies`,
# qcompiler/quantize/methods/base.py), next to the measurements they come from; the defaults here serve an object
# that declares none of them.
BASE_BYTES = 600 * 1024**2
DEFAULT_PARAM_FACTOR = 3.5
DEFAULT_ACTIVATION_COPIES = 3


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak resident bytes of an export (`total`) and its parts."""

    params: int
    param_bytes: int
    activation_bytes: int
    total: int

    def describe(self) -> str:
        return (f"~{self.total / GIB:.1f} GiB ({self.params / 1e6:.0f}M parameters = {self.param_bytes / GIB:.2f} GiB "
                f"fp32, calibration activations {self.activation_bytes / GIB:.2f} GiB)")


def count_parameters(config: Any) -> int:
    """Parameters of the model `config` describes (built on the meta device: no memory, no weights read)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, yielded once


def estimate_memory(config: Any, method: Any, *, calibrated: bool, nsamples: int, seqlen: int,
                    offload: bool = False) -> MemoryEstimate:
    """Peak resident memory of `qcompiler export` on the model `config` describes.

    Args:
        method: the method class (`qcompiler.quantize.methods.get_method(name)`), or any object with its memory
            attributes `memory_param_factor`, `memory_offload_param_factor`, `memory_activation_copies` (see
            `qcompiler.quantize.methods.base.Method`; missing ones take the defaults of this module).
        calibrated: the method runs calibration windows (`nsamples` × `seqlen` tokens).
        offload: the weights are file pages (`--offload-weights`); what must fit is the anonymous memory.
    """
    if isinstance(method, str):
        raise TypeError("estimate_memory takes the method class (qcompiler.quantize.methods.get_method(name)), "
                        f"not its name '{method}'")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = count_parameters(config)
    param_bytes = params * 4
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    copies = getattr(method, "memory_activation_copies", DEFAULT_ACTIVATION_COPIES)
    activation_bytes = copies * nsamples * seqlen * hidden * 4 if calibrated else 0
    factor = getattr(method, "memory_param_factor", DEFAULT_PARAM_FACTOR)
    offload_factor = getattr(method, "memory_offload_param_factor", None)
    if offload and offload_factor is not None:
        factor = offload_factor
    total = BASE_BYTES + int(factor * param_bytes) + activation_bytes
    return MemoryEstimate(params=params, param_bytes=param_bytes, activation_bytes=activation_bytes, total=total)


def _cgroup_memory_files() -> list[tuple[str, str, str]]:
    """(limit, usage, stat) file paths of the memory cgroups this process is in, innermost first: cgroup v2 (the
    namespace root, as containers see it, and this process's own path) or v1's memory controller."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base = "/sys/fs/cgroup"
            names = ("memory.max", "memory.current", "memory.stat")
        elif "memory" in controllers.split(","):  # v1
            base = "/sys/fs/cgroup/memory"
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # a limit may be set on any ancestor
            folder = os.path.join(base, *parts[:depth])
            out.append(tuple(os.path.join(folder, n) for n in names))
    return out


def _cgroup_headroom() -> Optional[int]:
    """Bytes left under the tightest memory cgroup limit this process is in (containers, `--memory` caps), or None
    without a limit. Reclaimable page cache (inactive file pages) does not count as used."""
    best = None
    for limit_file, usage_file, stat_file in _cgroup_memory_files():
        try:
            limit = open(limit_file).read().strip()
            if limit == "max" or int(limit) >= 2**62:  # v1 writes "no limit" as a huge number
                continue
            used = int(open(usage_file).read().strip())
            stat = dict(line.split() for line in open(stat_file).read().splitlines() if line.count(" ") == 1)
            used -= int(stat.get("inactive_file", stat.get("total_inactive_file", 0)))
            room = max(0, int(limit) - used)
            best = room if best is None else min(best, room)
        except (OSError, ValueError):
            continue
    return best


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation (MemAvailable + free swap on Linux, capped by the memory
    cgroup limits this process is under, v1 or v2), or None if unknown."""
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        free = info["MemAvailable"] + info.get("SwapFree", 0)
        headroom = _cgroup_headroom()
        return free if headroom is None else min(free, headroom)
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def check_memory(estimate: MemoryEstimate, available: Optional[int] = None) -> None:
    """QCompilerError when the estimate exceeds the available memory (unknown availability passes)."""
    available = available_memory() if available is None else available
    if available is not None and estimate.total > available:
        raise QCompilerError(
            f"not enough memory: this export needs {estimate.describe()}, {available / GIB:.1f} GiB available "
            f"(lower --nsamples/--seqlen, free memory, --offload-weights to keep the weights in a file (local "
            f"safetensors folders and GGUF files), or pass --no-memory-check to try anyway)")


def check_loaded_weights(model: torch.nn.Module, missing_keys: Iterable[str] = ()) -> None:
    """QCompilerError if the checkpoint lacked weights (initialised at random) or holds NaN/Inf."""
    missing = sorted(set(missing_keys))
    if missing:
        config = getattr(model, "config", None)
        tied = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                       "tie_word_embeddings", None)
        hint = ""
        if any(k.startswith("lm_head") for k in missing) and tied is False:
            hint = (" — the checkpoint has no lm_head but config.json says tie_word_embeddings: false; if the model "
                    "shares its input embedding with the output layer, set tie_word_embeddings: true")
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise QCompilerError(f"the checkpoint lacks {len(missing)} weight(s) the model needs ({shown}): transformers "
                             f"would initialise them at random{hint}")
    for name, p in model.named_parameters():
        check_finite_weight(name, p.detach())


def check_finite_weight(name: str, t: torch.Tensor) -> None:
    """QCompilerError if checkpoint weight `t` holds NaN/Inf."""
    bad = (~torch.isfinite(t)).sum().item() if t.is_floating_point() else 0
    if bad:
        raise QCompilerError(f"weight {name} {tuple(t.shape)} holds {bad} NaN/Inf value(s): the checkpoint is "
                             "corrupt or was saved from a diverged run")


def check_finite(t: torch.Tensor, where: str) -> None:
    """QCompilerError if calibration activations `t` hold NaN/Inf (`where`: e.g. "the input of model.layers.3")."""
    bad = (~torch.isfinite(t)).sum().item()
    if bad:
        raise QCompilerError(f"calibration activations at {where} hold {bad} NaN/Inf value(s) of {t.numel()} (the "
                             "model overflows on the calibration text: check the weights or load in fp32)")


def check_linear_sizes(shapes: dict[str, tuple[int, int]], *, outliers: bool) -> None:
    """QCompilerError for linears the SpQRMatMul format cannot store: with outliers, column indices are uint16."""
    if not outliers:
        return
    too_wide = {path: K for path, (K, _N) in shapes.items() if K > 65536}
    if too_wide:
        path, K = next(iter(too_wide.items()))
        raise QCompilerError(f"{path} has {K} input features: SpQR outliers store uint16 column indices (K ≤ 65536); "
                             f"{len(too_wide)} linear(s) affected — quantize without outliers "
                             "(--outlier-threshold inf) or use gptq/rtn")

