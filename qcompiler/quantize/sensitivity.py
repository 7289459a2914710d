"""How much each linear's quantization error would cost the model's loss, per candidate setting (`--target-bits`).

The estimate of quantizing linear `l` (weight `W [N, K]`) to `Ŵ` is the Fisher-weighted output error

    s = Σ_n F_n · (ΔW H ΔWᵀ)_nn,    ΔW = W − Ŵ,    F_n = Σ_t (∂ℓ_t / ∂y_tn)²,    H = 2/n Σ x xᵀ

— the second-order (empirical Fisher) loss increase `½ Σ_t (g_tᵀ ΔW x_t)²`, with the output gradients `g` taken
independent of the inputs `x` and across output channels (as HAWQ / SqueezeLLM-style sensitivities do). `F` comes
from one forward and backward of the full-precision model per probe window (`output_fisher`), `H` from the same
block-sequential engine the methods use, on the full-precision model (`probe`); `Ŵ` comes from the method's
`measure` callback (SpQR: its format without error feedback per setting, scaled by SpQR proper on a reference
setting; `SpQR._quantize_to_target`). Both use a subset of the calibration windows (`PROBE_WINDOWS` × at most
`PROBE_TOKENS`): the allocation needs the ranking of layers and settings, not the Hessians SpQR itself is
calibrated on.

The probe does not depend on the target, so an export can reuse an earlier one's (`--sensitivity FOLDER`, as
llama.cpp's `--imatrix` file): `probe_record` stores it in `quant_config.json` with the fingerprint `probe_key` of
what it was measured on (the linears' weights, the probe windows, the menu's settings), `load_probe` refuses a record
whose fingerprint differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from qcompiler import QCompilerError
from qcompiler.models.families import Family, quantizable_linears
from qcompiler.quantize.allocation import LayerOptions
from qcompiler.quantize.calibration import calibration_mode, quantize_blockwise

log = logging.getLogger(__name__)

PROBE_WINDOWS = 16  # calibration windows the probe uses (the first ones)
PROBE_TOKENS = 512  # tokens per probe window (a window's prefix)
PROBE_FORMAT = 1  # version of the stored record (`probe_record`)


def probe_windows(calibration: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The first `PROBE_WINDOWS` calibration windows, each cut to its first `PROBE_TOKENS` tokens."""
    return [torch.as_tensor(w).reshape(1, -1)[:, :PROBE_TOKENS] for w in list(calibration)[:PROBE_WINDOWS]]


def output_fisher(model: torch.nn.Module, family: Family, windows: Sequence[torch.Tensor], *,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """`F_n = Σ_t (∂ℓ_t / ∂y_tn)²` per quantizable linear (float32 `[out_features]`), ℓ_t the next-token NLL of
    token t (summed over each window, so a token's gradient is not scaled by the window length).

    The parameters are frozen during the backward (no weight gradients are computed); the graph starts at the
    embedding's output."""
    linears = quantizable_linears(model, family)
    fisher = {path: torch.zeros(lin.out_features, dtype=torch.float32) for path, lin in linears.items()}

    def keep_grad(path: str):
        def add(g: torch.Tensor) -> None:  # returns None: the gradient flows on unchanged
            fisher[path].add_(g.detach().float().reshape(-1, g.shape[-1]).square().sum(0).cpu())

        def hook(_module, _args, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(add)
        return hook

    def start_graph(_module, _args, out):
        return out.detach().requires_grad_(True)

    embeddings = model.get_input_embeddings()
    if embeddings is None:
        raise QCompilerError("the model has no input embeddings to start the sensitivity probe's backward from")
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    handles = [embeddings.register_forward_hook(start_graph)]
    handles += [lin.register_forward_hook(keep_grad(path)) for path, lin in linears.items()]
    device = next(model.parameters()).device
    try:
        with calibration_mode(model), torch.enable_grad():
            for w in tqdm(windows, desc="sensitivity (gradients)", disable=not progress, unit="window"):
                ids = torch.as_tensor(w).reshape(1, -1).to(device)
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
                loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum")
                loss.backward()
                del logits, loss
    finally:
        for h in handles:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
    return fisher


def weighted_error(delta: torch.Tensor, H: torch.Tensor, fisher: torch.Tensor) -> float:
    """`Σ_n F_n (ΔW H ΔWᵀ)_nn` for `delta = ΔW [N, K]`, `H [K, K]`, `fisher = F [N]`."""
    rows = ((delta.float() @ H.float()) * delta.float()).sum(dim=1)
    return float((fisher.to(rows.device).float() * rows).sum())


@dataclasses.dataclass
class Probe:
    """What `probe` measured.

    Attributes:
        options: module path → `LayerOptions` (costs and stored bits per setting), in quantization order.
        seconds: {"gradients", "settings"} wall time of the two parts (of the probe that measured them).
        source: the quant_config.json it was read from (`load_probe`); None where measured by this export.
    """

    options: dict[str, LayerOptions]
    seconds: dict[str, float]
    source: Optional[str] = None


def probe(model: torch.nn.Module, family: Family, calibration: Sequence[torch.Tensor],
          measure: Callable[[str, torch.nn.Linear, torch.Tensor, torch.Tensor], tuple[np.ndarray, np.ndarray]], *,
          progress: bool = True, parallel_solves: int = 1, device: Optional[torch.device] = None) -> Probe:
    """Costs and stored bits of every quantizable linear under each setting, on the full-precision model (which is
    left unchanged): `measure(path, linear, H, F)` → `(costs [C], bits [C])` for one linear, given its input Hessian
    `H` (it must not modify it) and its output Fisher `F [out_features]` (`output_fisher`; `weighted_error` turns a
    candidate weight into its cost). `device`: where the settings pass runs (`quantize_blockwise`); the gradients
    run where the model is."""
    windows = probe_windows(calibration)
    tick = time.perf_counter()
    fisher = output_fisher(model, family, windows, progress=progress)
    t_grad = time.perf_counter() - tick
    options: dict[str, LayerOptions] = {}

    def solve(path: str, linear: torch.nn.Linear, H: torch.Tensor) -> None:
        costs, bits = measure(path, linear, H, fisher[path])
        options[path] = LayerOptions(params=linear.weight.numel(), costs=np.asarray(costs, dtype=np.float64),
                                     bits=np.asarray(bits, dtype=np.float64))

    tick = time.perf_counter()
    quantize_blockwise(model, family, windows, solve, true_sequential=False, progress=progress,
                       desc="sensitivity (settings)", parallel_solves=parallel_solves, install=False, device=device)
    order = list(quantizable_linears(model, family))
    return Probe(options={p: options[p] for p in order if p in options},
                 seconds={"gradients": t_grad, "settings": time.perf_counter() - tick})


def probe_key(model: torch.nn.Module, family: Family, calibration: Sequence[torch.Tensor], *,
              settings: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Fingerprint of what `probe` measures on: sha256 of the quantizable linears' weights (as float32, with their
    paths), of the probe windows' tokens, and the settings (one JSON-able dict per menu entry)."""
    from qcompiler.emit import jsonable  # at call time: emit imports the graph stack

    weights = hashlib.sha256()
    for path, linear in quantizable_linears(model, family).items():
        weights.update(path.encode())
        weights.update(linear.weight.detach().float().contiguous().cpu().numpy().tobytes())
    tokens = hashlib.sha256()
    for w in probe_windows(calibration):
        tokens.update(w.to(torch.int64).contiguous().numpy().tobytes())
    return {"format": PROBE_FORMAT, "weights": weights.hexdigest()[:16], "windows": tokens.hexdigest()[:16],
            "settings": jsonable(list(settings))}  # as quant_config.json stores it ("inf" as text)


def probe_record(found: Probe, key: dict[str, Any]) -> dict[str, Any]:
    """The probe as JSON (`quant_config.json` → `allocation.probe`); floats round-trip exactly."""
    return {"key": key, "seconds": found.seconds,
            "linears": {p: {"costs": o.costs.tolist(), "bits": o.bits.tolist()} for p, o in found.options.items()}}


_KEY_NAMES = {"format": "record format", "weights": "model (its linears' weights differ)",
              "windows": "calibration (its probe windows' tokens differ)", "settings": "menu of settings"}


def load_probe(source: str | Path, key: dict[str, Any], model: torch.nn.Module, family: Family) -> Probe:
    """The probe an earlier export stored (`source`: its folder or its quant_config.json), after checking it was
    measured on what `key` describes; a one-line `QCompilerError` otherwise."""
    path = Path(source)
    if path.is_dir():
        path = path / "quant_config.json"
    if not path.is_file():
        raise QCompilerError(f"--sensitivity {source}: no quant_config.json there (give an earlier --target-bits "
                             "export's folder)")
    try:
        record = json.loads(path.read_text()).get("allocation", {}).get("probe")
    except (json.JSONDecodeError, AttributeError) as e:
        raise QCompilerError(f"--sensitivity {source}: unreadable quant_config.json ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("linears"), dict):
        raise QCompilerError(f"--sensitivity {source}: no sensitivity probe recorded there (an export with "
                             "--target-bits records one)")
    stored = record.get("key") or {}
    for field, name in _KEY_NAMES.items():
        if stored.get(field) != key[field]:
            raise QCompilerError(f"--sensitivity {source}: probed on another {name}; drop --sensitivity to probe "
                                 "this export")
    linears = quantizable_linears(model, family)
    if set(record["linears"]) != set(linears):
        raise QCompilerError(f"--sensitivity {source}: its linears are not this model's")
    options = {p: LayerOptions(params=linears[p].weight.numel(), costs=np.asarray(record["linears"][p]["costs"],
                                                                                   dtype=np.float64),
                               bits=np.asarray(record["linears"][p]["bits"], dtype=np.float64)) for p in linears}
    return Probe(options=options, seconds=dict(record.get("seconds") or {}), source=str(path))
