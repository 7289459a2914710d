"""`--target-bits`: which SpQR setting each linear gets so that the stored bits average exactly the target.

Each linear `l` has a menu of settings `c` (`MENU`), each with a measured cost `s[l, c]` (the estimated loss
increase of quantizing `l` with `c`, qcompiler/quantize/sensitivity.py) and its stored bits `b[l, c]` (the layer's
whole `SpQRWeight`: codes, statistics, outliers, permutation). `allocate` solves the multiple-choice knapsack

    minimize Σ_l s[l, c_l]   subject to   Σ_l b[l, c_l] ≤ B · (parameters)

by its Lagrangian (per linear `argmin_c s + λ·b`, λ bisected to the smallest that fits) and then a greedy fill of
the slack the convex hull leaves (the upgrade with the best cost decrease per added bit, while one fits).

The probe's bits are estimates: SpQR proper runs afterwards on the sequentially quantized model and keeps a
somewhat different number of outliers. `BitBudget` closes the loop: before each decoder layer is quantized, the
remaining linears are re-allocated with the budget that is left after what the finished layers actually stored (and
each setting's estimates corrected by its realized/estimated ratio so far), so the realized average lands on the
target up to the last layer's granularity.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Optional, Sequence

import numpy as np

from qcompiler import QCompilerError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Choice:
    """One menu entry: a name (recorded per layer in quant_config.json), the `SpQRConfig` fields it sets, and
    whether the probe runs SpQR proper on it (`reference`: the settings of the same input order are ranked by their
    error-feedback-free cost scaled by the reference's SpQR / feedback-free ratio; sensitivity.py)."""

    name: str
    settings: dict[str, Any]
    reference: bool = False


# Ordered by increasing stored bits. Outliers cost 32 bits each (fp16 delta + column index), so the low-bit settings
# keep fewer of them (higher τ) or none. The in-order settings keep groups aligned with the input order: a model whose
# weights already sit on a 32-column grid (e.g. a GGUF Q4_* source) is re-quantized almost exactly by them, exactly
# with fp16 statistics. 8-bit codes serve the most sensitive linears at high targets.
MENU: tuple[Choice, ...] = (
    Choice("w2g32", {"bits": 2, "group_size": 32, "stat_group_size": 32, "outlier_threshold": float("inf")}),
    Choice("w2g16", {"bits": 2, "group_size": 16, "stat_group_size": 32, "outlier_threshold": 1.0}),
    Choice("w3g32", {"bits": 3, "group_size": 32, "stat_group_size": 32, "outlier_threshold": 0.5}),
    Choice("w3g16", {"bits": 3, "group_size": 16, "stat_group_size": 32, "outlier_threshold": 0.3}, reference=True),
    Choice("w4g32", {"bits": 4, "group_size": 32, "stat_group_size": 16, "outlier_threshold": 0.3}),
    Choice("w4g32-inorder", {"bits": 4, "group_size": 32, "stat_group_size": 16, "outlier_threshold": 0.3,
                             "act_order": False}, reference=True),
    Choice("w4g32-inorder-s4", {"bits": 4, "group_size": 32, "stat_bits": 4, "stat_group_size": 16,
                                "outlier_threshold": 0.3, "act_order": False}),
    Choice("w4g16", {"bits": 4, "group_size": 16, "stat_group_size": 16, "outlier_threshold": 0.2}),
    Choice("w4g32-inorder-fp16", {"bits": 4, "group_size": 32, "stat_bits": 0, "outlier_threshold": float("inf"),
                                  "act_order": False}),
    Choice("w8g128", {"bits": 8, "group_size": 128, "stat_bits": 0, "outlier_threshold": float("inf")}),
)


def allocate(costs: np.ndarray, bits: np.ndarray, budget: float) -> np.ndarray:
    """The menu index per linear minimizing `Σ costs[l, c_l]` with `Σ bits[l, c_l] ≤ budget`.

    Args:
        costs: float `[L, C]` estimated loss increase per linear and setting (`inf`: not allowed).
        bits: float `[L, C]` stored bits of the whole linear per setting.
        budget: total stored bits allowed.

    Returns:
        int `[L]`. QCompilerError if even the cheapest settings exceed `budget`.
    """
    costs = np.asarray(costs, dtype=np.float64)
    bits = np.asarray(bits, dtype=np.float64)
    L = costs.shape[0]
    if L == 0:
        return np.zeros(0, dtype=np.int64)
    rows = np.arange(L)
    allowed = np.isfinite(costs)
    if not allowed.any(axis=1).all():
        raise QCompilerError("a linear has no allowed setting")
    fewest = np.where(allowed, bits, np.inf).argmin(axis=1)
    if bits[rows, fewest].sum() > budget:
        raise QCompilerError(f"the budget of {budget:.0f} bits is below the fewest the settings store "
                             f"({bits[rows, fewest].sum():.0f})")

    def pick(lam: float) -> np.ndarray:
        # ties (equal Lagrangian) go to the fewer bits
        score = np.where(allowed, costs + lam * bits, np.inf)
        best = score.min(axis=1, keepdims=True)
        tied = np.where(score <= best, bits, np.inf)
        return tied.argmin(axis=1)

    choice = pick(0.0)
    if bits[rows, choice].sum() > budget:
        scale = max(float(np.nanmax(np.where(allowed, costs, 0.0))), 1e-30) / max(float(bits.min()), 1e-30)
        lo, hi = 0.0, scale
        while bits[rows, pick(hi)].sum() > budget:
            hi *= 4.0
            if hi > scale * 4.0**40:  # cannot happen with finite costs; keep the fewest bits
                break
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if bits[rows, pick(mid)].sum() > budget:
                lo = mid
            else:
                hi = mid
        choice = pick(hi)
        if bits[rows, choice].sum() > budget:
            choice = fewest.copy()
    # greedy fill of the slack: the best cost decrease per added bit while an upgrade fits
    total = bits[rows, choice].sum()
    while True:
        slack = budget - total
        dbits = bits - bits[rows, choice][:, None]
        dcost = costs[rows, choice][:, None] - costs
        ok = allowed & (dbits > 0) & (dbits <= slack) & (dcost > 0)
        if not ok.any():
            break
        gain = np.where(ok, dcost / np.where(dbits > 0, dbits, 1.0), -np.inf)
        l, c = np.unravel_index(int(gain.argmax()), gain.shape)
        total += dbits[l, c]
        choice[l] = c
    return choice


@dataclasses.dataclass
class LayerOptions:
    """The probe's measurements of one linear.

    Attributes:
        params: weight parameters (N·K).
        costs: `[C]` estimated loss increase per menu setting (sensitivity.py).
        bits: `[C]` stored bits of the whole linear per menu setting (the probe's own `SpQRWeight`).
    """

    params: int
    costs: np.ndarray
    bits: np.ndarray


class BitBudget:
    """Closed-loop allocation over the linears in quantization order (see the module docstring).

    `choice_for(path)` re-allocates the linears not yet recorded when it first sees `path`'s decoder layer (`layer_of`),
    `record(path, choice, bits)` books what a linear actually stored. Thread-safe: the linears of one layer may be
    solved concurrently; a layer's plan only depends on the layers before it (all recorded before it starts), so the
    result does not depend on the threads' timing.
    """

    def __init__(self, options: dict[str, LayerOptions], *, target_bits: float, layer_of, names: Sequence[str]):
        self.paths = list(options)
        self.options = options
        self.names = list(names)
        self.layer_of = layer_of
        self.params = sum(o.params for o in options.values())
        self.budget = target_bits * self.params
        self.target_bits = target_bits
        costs, bits = self._matrices(self.paths)
        rows = np.arange(len(self.paths))
        self.floor = float(bits.min(axis=1).sum() / self.params) if self.paths else 0.0
        self.ceiling = float(bits[rows, np.where(np.isfinite(costs), costs, np.inf).argmin(axis=1)].sum()
                             / self.params) if self.paths else 0.0
        if self.paths and target_bits < self.floor:
            raise QCompilerError(f"--target-bits {target_bits:g} is below the fewest bits the settings store on this "
                                 f"model ({self.floor:.3f}: every linear at {self.names[0]})")
        if target_bits > self.ceiling:
            log.warning("--target-bits %g is above the most the settings store on this model (%.3f): every linear "
                        "gets the setting of lowest estimated loss", target_bits, self.ceiling)
        self.realized: dict[str, tuple[int, float]] = {}  # path → (choice, stored bits)
        self.plan: dict[str, int] = {}
        self.planned_layers: set[str] = set()
        self._lock = threading.Lock()

    def _matrices(self, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        costs = np.stack([self.options[p].costs for p in paths]) if paths else np.zeros((0, len(self.names)))
        bits = np.stack([self.options[p].bits for p in paths]) if paths else np.zeros((0, len(self.names)))
        return costs.astype(np.float64), bits.astype(np.float64)

    def _correction(self) -> np.ndarray:
        """`[C]` realized / estimated bits of each setting over the recorded linears (1 where none yet)."""
        real = np.zeros(len(self.names))
        est = np.zeros(len(self.names))
        for path, (c, stored) in self.realized.items():
            real[c] += stored
            est[c] += self.options[path].bits[c]
        return np.where(est > 0, real / np.where(est > 0, est, 1.0), 1.0)

    def _allocate(self, paths: Sequence[str], budget: float) -> np.ndarray:
        costs, bits = self._matrices(paths)
        bits = bits * self._correction()[None, :]
        # the finished layers may have stored more than estimated: the rest then gets at least its fewest bits
        return allocate(costs, bits, max(budget, bits.min(axis=1).sum()))

    def choice_for(self, path: str) -> int:
        with self._lock:
            layer = self.layer_of(path)
            if layer not in self.planned_layers:
                remaining = [p for p in self.paths if p not in self.realized]
                left = self.budget - sum(bits for _, bits in self.realized.values())
                self.plan.update(zip(remaining, self._allocate(remaining, left)))
                self.planned_layers.add(layer)
            return int(self.plan[path])

    def record(self, path: str, choice: int, stored_bits: float) -> None:
        with self._lock:
            self.realized[path] = (int(choice), float(stored_bits))

    def summary(self) -> dict[str, Any]:
        """Realized average, the target, and how many linears (and parameters) took each setting."""
        stored = sum(bits for _, bits in self.realized.values())
        params = sum(self.options[p].params for p in self.realized)
        counts: dict[str, dict[str, int]] = {}
        for path, (c, _) in self.realized.items():
            entry = counts.setdefault(self.names[c], {"linears": 0, "params": 0})
            entry["linears"] += 1
            entry["params"] += self.options[path].params
        return {"target_bits": self.target_bits, "realized_bits": stored / params if params else 0.0,
                "settings": counts}


def layer_prefix(path: str, layers: str) -> str:
    """The decoder layer of a linear's path ("model.layers.3.mlp.up_proj" → "model.layers.3")."""
    rest = path[len(layers) + 1:] if path.startswith(layers + ".") else path
    return f"{layers}.{rest.split('.', 1)[0]}"


def describe(summary: dict[str, Any]) -> Optional[str]:
    """One line: realized average against the target, and the settings' shares of parameters."""
    settings = summary.get("settings") or {}
    params = sum(v["params"] for v in settings.values())
    if not params:
        return None
    shares = ", ".join(f"{name} {100 * v['params'] / params:.0f}%" for name, v in
                       sorted(settings.items(), key=lambda kv: -kv[1]["params"]))
    return (f"--target-bits {summary['target_bits']:g}: {summary['realized_bits']:.3f} bits/param realized "
            f"({shares} of the parameters)")
