"""Block-sequential calibration: run the calibration windows through the model one decoder layer at a time,
collect each quantizable linear's input Hessian, let a per-linear solver (GPTQ, SpQR, ...) quantize it, and feed the
*quantized* layer's outputs to the next layer.

The engine is generic: what is family-specific (where the layers are, which linears, in which true-sequential
groups) comes from the `Family` record (qcompiler/models/families.py). Memory is one decoder layer's work plus two
activation buffers `[nsamples, seqlen, hidden]` float32 (inputs and outputs of the current layer, swapped after each
layer), so a model never has to fit its activations for all layers at once.

Per decoder layer:

1. For each stage (one per `Family.sequential` group with `true_sequential=True`, else one stage with all groups)
   the layer runs forward on all windows, in chunks of `CHUNK_TOKENS` tokens, with a forward pre-hook on the first
   linear of every group of the stage accumulating `H = 2/n Σ x xᵀ` (float32, n = windows, GPTQ's `add_batch`
   running average). Linears of one group see the same input, so they share one H. The forward stops (an internal
   exception) as soon as every hooked group has seen its input: the rest of the layer is not computed.
2. `solver(path, linear, H)` quantizes each linear of the stage; its `evaluated` weight replaces `linear.weight`,
   so the next stage's inputs come from the quantized linears.
3. A last forward of the quantized layer produces the next layer's inputs. After the last layer, the final norm over
   those outputs gives the lm_head's input Hessian (`QuantizationResult.head_hessian`, for `--lm-head gptq`: one
   layer's forward more than the layers need, instead of a forward of the whole model later).

While the engine runs, a model loaded with eager attention is switched to SDPA attention if it supports it (the
same math up to fp32 rounding, without materializing `[heads, seqlen, seqlen]` scores) and switched back at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from qcompiler import QCompilerError
from qcompiler.models.families import Family, get_module, iter_layers, layer_linears
from qcompiler.graph.format import SpQRWeight
from qcompiler.models.offload import keep_arrays, release_free_memory
from qcompiler.models.preflight import check_finite
from qcompiler.quantize.device import home_device, on_device, to_device
from qcompiler.quantize.result import QuantizationResult

log = logging.getLogger(__name__)

CHUNK_TOKENS = 2048  # tokens per forward call (windows per chunk = max(1, CHUNK_TOKENS // seqlen)); small chunks keep
# the elementwise work in cache (measured faster than 16384 at seqlen 2048)
HESSIAN_BLOCK = 512  # row-block width of the lower-triangular Hessian accumulation
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # forced to None: no KV cache


@dataclasses.dataclass
class LayerQuantization:
    """What a solver returns for one linear.

    Attributes:
        evaluated: `[out_features, in_features]` float32, the weight the quantizer evaluated, in the original column
            order; equal to `packed.dequantize()` up to fp32 rounding (bit for bit for the built-in methods).
        packed: the layer in `SpQRMatMul` form (qcompiler.graph.format).
        report: `layer_report(...)` (qcompiler/quantize/result.py) plus method-specific extras.
    """

    evaluated: torch.Tensor
    packed: SpQRWeight
    report: dict


LayerSolver = Callable[[str, torch.nn.Linear, torch.Tensor], LayerQuantization]
"""`solver(path, linear, H) -> LayerQuantization`: quantize one linear.

`path` is the full module path ("model.layers.3.mlp.down_proj"), `linear` still holds its original weight, `H` is
the `[in_features, in_features]` float32 Hessian `2/n Σ x xᵀ` of the linear's inputs (the solver may modify it)."""


# ---------------------------------------------------------------------------------------------------- captured inputs
@dataclasses.dataclass
class LayerInputs:
    """The inputs of decoder layer 0 for all calibration windows (and the buffers later layers reuse).

    Attributes:
        hidden: `[nsamples, seqlen, hidden]` float32, hidden states entering the current layer.
        calls: distinct `(extra positional args, kwargs)` the layers are called with (attention mask, position
            embeddings, ...), captured with batch size 1 (they broadcast over a chunk of windows).
        call_of: `[nsamples]` index into `calls` per window (usually all 0: every window has the same kwargs).
    """

    hidden: torch.Tensor
    calls: list[tuple[tuple, dict[str, Any]]]
    call_of: list[int]

    def to(self, device: torch.device) -> "LayerInputs":
        """The same inputs with every tensor on `device` (`--device`)."""
        return LayerInputs(hidden=self.hidden.to(device), calls=to_device(self.calls, device), call_of=self.call_of)

    def chunks(self, max_windows: int) -> list[tuple[int, int]]:
        """`[start, end)` window ranges of at most `max_windows` consecutive windows sharing one call."""
        out, start = [], 0
        n = len(self.call_of)
        for i in range(1, n + 1):
            if i == n or i - start == max_windows or self.call_of[i] != self.call_of[start]:
                out.append((start, i))
                start = i
        return out


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early (it carries nothing)."""


def _same(a: Any, b: Any) -> bool:
    """Structural equality of captured layer arguments (tensors compared by shape, dtype and value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable ==: treat as different
        return a is b


def capture_layer_inputs(model: torch.nn.Module, family: Family, calibration: Sequence[torch.Tensor]) -> LayerInputs:
    """Run the model up to decoder layer 0 for each window (`LongTensor [1, seqlen]`) and keep what layer 0 receives.

    Only the embeddings (and whatever the model computes before its first layer: rotary tables, causal mask) run; a
    forward pre-hook on layer 0 records the hidden states and keyword arguments and stops the forward.
    """
    if not calibration:
        raise QCompilerError("calibration needs at least one token window")
    windows = [torch.as_tensor(w).reshape(1, -1) for w in calibration]
    seqlen = windows[0].shape[1]
    if any(w.shape[1] != seqlen for w in windows):
        lengths = sorted({w.shape[1] for w in windows})
        raise QCompilerError(f"calibration windows must all have the same length (got {lengths})")
    first = get_module(model, f"{family.layers}.0")
    device = next(model.parameters()).device
    hidden: Optional[torch.Tensor] = None
    calls: list[tuple[tuple, dict[str, Any]]] = []
    call_of: list[int] = []

    def catch(_module, args, kwargs):
        nonlocal hidden
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        for key in _CACHE_KWARGS:
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if hidden is None:
            hidden = torch.empty((len(windows), *x.shape[1:]), dtype=torch.float32, device=x.device)
        hidden[len(call_of)] = x[0].float()
        call = (tuple(args[1:]), kwargs)
        for i, known in enumerate(calls):
            if _same(known, call):
                call_of.append(i)
                break
        else:
            calls.append(call)
            call_of.append(len(calls) - 1)
        raise _StopForward

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for w in windows:
            try:
                model(input_ids=w.to(device), use_cache=False)
            except _StopForward:
                continue
            raise QCompilerError(f"the model's forward never reached {family.layers}.0")
    finally:
        handle.remove()
    return LayerInputs(hidden=hidden, calls=calls, call_of=call_of)


# ---------------------------------------------------------------------------------------------------- hessians
class Hessian:
    """Running `H = 2/n Σ x xᵀ` over calibration windows (GPTQ's `add_batch`), float32 `[K, K]`.

    Only the lower triangle is accumulated (row blocks of `HESSIAN_BLOCK` features: `H[i:j, :j] += x[:, i:j]ᵀ x[:, :j]`),
    which saves about a third of the work for wide inputs (measured 476 → 314 ms for 16384 tokens × 1536); `value()`
    mirrors it into the upper triangle, so the result is exactly symmetric.
    """

    def __init__(self, K: int, device=None):
        self.H = torch.zeros((K, K), dtype=torch.float32, device=device)
        self.n = 0  # windows seen

    def add(self, x: torch.Tensor, windows: int) -> None:
        """Add the inputs `x [..., K]` of `windows` calibration windows."""
        x = x.reshape(-1, x.shape[-1]).float()
        self.n += windows
        self.H.mul_((self.n - windows) / self.n)
        K = x.shape[1]
        step = max(1, -(-K // max(1, -(-K // HESSIAN_BLOCK))))  # equal row blocks of at most HESSIAN_BLOCK
        for i in range(0, K, step):
            j = min(K, i + step)
            self.H[i:j, :j].addmm_(x[:, i:j].T, x[:, :j], alpha=2.0 / self.n)

    def value(self) -> torch.Tensor:
        """The symmetric `[K, K]` Hessian (the lower triangle mirrored; the accumulator is consumed)."""
        H = self.H
        upper = torch.triu(torch.ones_like(H, dtype=torch.bool), diagonal=1)
        H[upper] = H.T[upper]
        return H


def layer_output(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, (tuple, list)) else y


def _run_chunks(
    layer: torch.nn.Module,
    inputs: LayerInputs,
    chunk_windows: int,
    on_chunk: Optional[Callable[[int], None]] = None,
    out: Optional[torch.Tensor] = None,
) -> None:
    """Forward `layer` over all windows in chunks; `on_chunk(n_windows)` before each chunk, outputs into `out`
    (when given). A `_StopForward` raised by a hook ends that chunk's forward."""
    dtype = next(layer.parameters()).dtype
    for a, b in inputs.chunks(chunk_windows):
        args, kwargs = inputs.calls[inputs.call_of[a]]
        if on_chunk is not None:
            on_chunk(b - a)
        try:
            y = layer(inputs.hidden[a:b].to(dtype), *args, **kwargs)
        except _StopForward:
            continue
        if out is not None:
            out[a:b] = layer_output(y)


def collect_hessians(
    layer: torch.nn.Module,
    groups: Sequence[Sequence[torch.nn.Linear]],
    inputs: LayerInputs,
    chunk_windows: int,
) -> list[torch.Tensor]:
    """H of the input of each group (one per group: its linears share their input), from a forward of `layer` over
    all windows that stops once every group has seen its input."""
    hessians = [Hessian(g[0].in_features, device=g[0].weight.device) for g in groups]
    seen: set[int] = set()
    windows = 0

    def start(n: int) -> None:
        nonlocal windows
        seen.clear()
        windows = n

    def hook_for(i: int):
        def hook(_module, args):
            hessians[i].add(args[0], windows)
            seen.add(i)
            if len(seen) == len(groups):
                raise _StopForward

        return hook

    handles = [g[0].register_forward_pre_hook(hook_for(i)) for i, g in enumerate(groups)]
    try:
        _run_chunks(layer, inputs, chunk_windows, on_chunk=start)
    finally:
        for h in handles:
            h.remove()
    return [h.value() for h in hessians]


# ---------------------------------------------------------------------------------------------------- engine
@contextlib.contextmanager
def calibration_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, and SDPA attention instead of eager where the model supports it; restored on exit."""
    training = model.training
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    switched = False
    if attn == "eager" and getattr(model, "_supports_sdpa", False) and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("sdpa")
            switched = config._attn_implementation == "sdpa"
        except Exception as e:  # noqa: BLE001 - keep eager attention: slower, same result
            log.debug("calibration keeps eager attention (%s)", e)
    model.eval()
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(attn)
        model.train(training)


def quantize_blockwise(
    model: torch.nn.Module,
    family: Family,
    calibration: Sequence[torch.Tensor],
    solver: LayerSolver,
    *,
    true_sequential: bool = True,
    progress: bool = True,
    desc: str = "",
    parallel_solves: int = 1,
    install: bool = True,
    device: Optional[torch.device] = None,
) -> QuantizationResult:
    """Quantize every quantizable linear of `model` layer by layer on calibration data (see the module docstring).

    Args:
        model: a HF causal LM of `family`; its linears are replaced in place by their evaluated weights.
        family: where the layers and their linears are.
        calibration: token windows, each `LongTensor [1, seqlen]` (all the same length).
        solver: `solver(path, linear, H) -> LayerQuantization`, called once per linear in layer and group order.
        true_sequential: quantize the `family.sequential` groups of a layer one after another, each calibrated on
            inputs computed with the groups before it already quantized (GPTQ `--true-sequential`); False: all
            linears of a layer are calibrated on the unquantized layer (one forward for all Hessians; SpQR's
            default).
        progress: show a progress bar over layers.
        desc: progress bar / log prefix (e.g. "gptq 4-bit g128").
        parallel_solves: solve up to this many linears of a stage concurrently, in threads, with torch on one
            intra-op thread each (for solvers made of many small ops, such as SpQR's column loop, which cannot use
            intra-op threads; results are identical and installed in the same order).
        install: replace each linear's weight by its evaluated weight (False: the solver's return value is ignored,
            the model stays as it is, each layer's successors see its full-precision outputs, and the lm_head's
            Hessian is skipped; for probes that try settings without committing to one).
        device: where the Hessians, solves and forwards run (`--device`, qcompiler/quantize/device.py): the layer
            inputs move there once, each decoder layer while it is quantized; None: where the model is.

    Returns:
        `QuantizationResult` with `layers` and `report` per module path and an empty `config` (the method fills it).
    """
    desc = desc or "calibrating"
    layers_out: dict[str, SpQRWeight] = {}
    report: dict[str, dict] = {}
    timings: dict[str, dict[str, float]] = {}
    with torch.no_grad(), calibration_mode(model):
        tick = time.perf_counter()
        inputs = capture_layer_inputs(model, family, calibration)
        home = home_device(model)
        if device is not None and device != home:
            inputs = inputs.to(device)
        else:
            device = None
        if device is not None and device.type != "cpu":
            parallel_solves = 1  # the threads exist to use CPU cores a column loop leaves idle
        seqlen = inputs.hidden.shape[1]
        chunk_windows = max(1, CHUNK_TOKENS // seqlen)
        log.info("%s: captured %d windows x %d tokens in %.1fs", desc, inputs.hidden.shape[0], seqlen,
                 time.perf_counter() - tick)
        outputs = torch.empty_like(inputs.hidden)
        layers = list(iter_layers(model, family))
        head = _norm_and_head(model, family, inputs.hidden.shape[-1]) if install else None
        bar = tqdm(layers, desc=desc, disable=not progress, unit="layer")
        for index, (layer_path, layer) in enumerate(bar):
            tick = time.perf_counter()
            check_finite(inputs.hidden, f"the input of {layer_path}")
            with on_device(layer, device):
                t_forward = 0.0
                linears = layer_linears(layer, family)
                groups = [[(name, linears[name]) for name in group] for group in family.sequential]
                stages = [[g] for g in groups] if true_sequential else [groups]
                errors = []
                for stage in stages:
                    t = time.perf_counter()
                    hessians = collect_hessians(layer, [[lin for _, lin in g] for g in stage], inputs, chunk_windows)
                    t_forward += time.perf_counter() - t
                    jobs = []
                    for group, H in zip(stage, hessians):
                        for j, (name, linear) in enumerate(group):
                            h = H if j == len(group) - 1 else H.clone()  # a solver may modify its H
                            jobs.append((f"{layer_path}.{name}", linear, h))
                    del hessians
                    for (path, linear, _), result in zip(jobs, _solve_all(solver, jobs, parallel_solves)):
                        if not install:  # a probe: it keeps what it measured itself
                            continue
                        _install(path, linear, result)
                        layers_out[path] = keep_arrays(model, result.packed)
                        report[path] = result.report
                        errors.append(float(result.report.get("rel_error", float("nan"))))
                    del jobs
                if index + 1 < len(layers) or head is not None:
                    t = time.perf_counter()
                    _run_chunks(layer, inputs, chunk_windows, out=outputs)
                    t_forward += time.perf_counter() - t
                    inputs.hidden, outputs = outputs, inputs.hidden
            release_free_memory()
            mean_err = sum(errors) / max(len(errors), 1)
            seconds = time.perf_counter() - tick
            timings[layer_path] = {"seconds": seconds, "forward": t_forward, "solve": seconds - t_forward}
            bar.set_postfix(rel_error=f"{mean_err:.4f}")
            log.info("%s: %s: %d linears, mean rel_error %.4f, %.1fs (forward %.1fs, solve %.1fs)", desc,
                     layer_path, len(errors), mean_err, seconds, t_forward, seconds - t_forward)
        head_H = None
        if head is not None:
            norm, linear = head
            hessian = Hessian(linear.in_features, device=inputs.hidden.device)
            dtype = next(norm.parameters(), linear.weight).dtype
            with on_device(norm, device):
                for a, b in inputs.chunks(chunk_windows):
                    hessian.add(norm(inputs.hidden[a:b].to(dtype)), b - a)
            head_H = hessian.value().to(home)
            check_finite(head_H, f"the input Hessian of {family.lm_head}")
    return QuantizationResult(layers=layers_out, config={}, report=report, head_hessian=head_H,
                              head_windows=inputs.hidden.shape[0] if head_H is not None else 0,
                              layer_seconds=timings)


def _norm_and_head(model: torch.nn.Module, family: Family, hidden: int):
    """(final norm, lm_head) where the lm_head reads the final norm's output directly (a linear of `hidden` inputs:
    a projection between them, as OPT's `project_out`, changes the width), else None."""
    try:
        norm, head = get_module(model, family.final_norm), get_module(model, family.lm_head)
    except (AttributeError, QCompilerError):
        return None
    if not isinstance(head, torch.nn.Linear) or head.in_features != hidden:
        return None
    return norm, head


def _solve_all(solver: LayerSolver, jobs: list, parallel: int) -> list:
    """`[solver(path, linear, H) for each job]`, up to `parallel` at a time in threads (torch single-threaded
    meanwhile: threads x intra-op threads would oversubscribe the cores)."""
    if parallel <= 1 or len(jobs) <= 1:
        return [solver(*job) for job in jobs]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(parallel, len(jobs))) as pool:
            return list(pool.map(lambda job: solver(*job), jobs))
    finally:
        torch.set_num_threads(saved)


def _install(path: str, linear: torch.nn.Linear, result: LayerQuantization) -> None:
    """Check a solver's result against the linear and write the evaluated weight into it."""
    shape = tuple(linear.weight.shape)
    if not isinstance(result, LayerQuantization):
        raise QCompilerError(f"{path}: solver returned {type(result).__name__}, not LayerQuantization")
    if tuple(result.evaluated.shape) != shape or (result.packed.N, result.packed.K) != shape:
        raise QCompilerError(
            f"{path}: solver result has shape {tuple(result.evaluated.shape)} / packed [{result.packed.N}, "
            f"{result.packed.K}], the weight is {list(shape)}"
        )
    linear.weight.copy_(result.evaluated.to(device=linear.weight.device, dtype=linear.weight.dtype))


# ---------------------------------------------------------------------------------------------------- lm_head
def head_hessian(model: torch.nn.Module, family: Family, calibration: Sequence[torch.Tensor], *,
                 progress: bool = True) -> torch.Tensor:
    """H = 2/n Σ x xᵀ of the lm_head's input (the final norm's output) over the calibration windows, float32 `[K, K]`.

    The whole model runs forward on each window as it is now (after the decoder's quantization: the lm_head is
    calibrated on the hidden states the quantized decoder produces, as GPTQ's sequential order would); a forward
    pre-hook on the lm_head adds its input and stops the forward, so the vocabulary projection (and its
    `[seqlen, vocab]` logits) never runs."""
    if not calibration:
        raise QCompilerError("the lm_head's calibration needs at least one token window")
    head = get_module(model, family.lm_head)
    hessian = Hessian(head.in_features, device=head.weight.device)
    device = next(model.parameters()).device

    def hook(_module, args):
        hessian.add(args[0], 1)
        raise _StopForward

    handle = head.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), calibration_mode(model):
            for w in tqdm(calibration, desc="lm_head hessian", disable=not progress, unit="window"):
                try:
                    model(input_ids=torch.as_tensor(w).reshape(1, -1).to(device), use_cache=False)
                except _StopForward:
                    continue
                raise QCompilerError(f"the model's forward never reached {family.lm_head}")
    finally:
        handle.remove()
    H = hessian.value()
    check_finite(H, f"the input Hessian of {family.lm_head}")
    return H
