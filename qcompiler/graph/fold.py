"""Fold math for invertible affine transforms, written once and used by the PyTorch merge and the graph passes.

Conventions (the ONNX layout: a linear is `z = x @ W + b` with `W [K, N]`; PyTorch's `weight` is `W.T`):

- an activation transform is `T(x) = (x + pre) @ P` and its inverse `x = x̃ @ Q + post` with `Q = P⁻¹`; AffineQuant's
  norm → linears transform is `pre = −δ`, `post = +δ`, `P = A⁻¹` (diagonal: `1 / s`), `Q = A`;
- `P` and `Q` are either a vector (a diagonal matrix) or a `[K, K]` matrix.

Every function computes in float64 and returns float32 (the stored dtype), and is differentiable: AffineQuant's
training builds its temporary weights with them, passing `compute=torch.float32` for speed (the merge and the passes
always use the float64 default). The merge (qcompiler/quantize/transforms.py) calls
them with the same float32 tensors the exported graph holds, so the folded graph and the merged PyTorch model hold
bit-identical weights (tests/test_fold.py holds the two against each other).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

Tensor = torch.Tensor


def _t64(x, compute: torch.dtype = torch.float64) -> Optional[Tensor]:
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x.to(compute).contiguous()  # differentiable: AffineQuant trains through these functions


def _f32(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.to(torch.float32).contiguous()


def _apply_right(x: Tensor, m: Tensor) -> Tensor:
    """`x @ m` for a matrix `m`, `x * m` (broadcast over the last dim) for a diagonal given as a vector."""
    return x * m if m.dim() == 1 else x @ m


def _apply_left(m: Tensor, w: Tensor) -> Tensor:
    """`m @ w` for a matrix `m`, `m[:, None] * w` for a diagonal given as a vector."""
    return m[:, None] * w if m.dim() == 1 else m @ w


def fold_into_norm(
    weight: Tensor, bias: Optional[Tensor], P: Tensor, pre: Optional[Tensor] = None, *, offset: float = 0.0,
    compute: torch.dtype = torch.float64,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Fold `T(y) = (y + pre) ⊙ P` (diagonal `P`) into a norm `y = x̂ ⊙ (weight + offset) + bias`.

    Returns `(weight', bias', leftover)`: `(weight + offset) ⊙ P − offset` (so the norm's effective scale is
    `(weight + offset) ⊙ P`: Gemma's RMSNorm stores `w` and computes `1 + w`, offset 1), `(bias + pre) ⊙ P`; a norm
    without bias (RMSNorm) cannot hold the shift, so `bias'` is None and `leftover = pre ⊙ P` must be added after the
    norm (or folded downstream with `fold_linear_input(..., pre=leftover)`), never dropped. `leftover` is None when
    there is nothing to add. The graph passes call it with offset 0: the exporter stores the norm's effective scale
    (`1 + w` constant-folded) as the weight initializer.
    """
    if P.dim() != 1:
        raise ValueError("only a diagonal transform folds into a norm (a full matrix stays a MatMul)")
    w, b, p, s = (_t64(t, compute) for t in (weight, bias, P, pre))
    new_w = (w + offset) * p - offset if offset else w * p
    if b is not None:
        new_b = (b + s) * p if s is not None else b * p
        return _f32(new_w), _f32(new_b), None
    leftover = None if s is None or not bool(torch.any(s != 0)) else _f32(s * p)
    return _f32(new_w), None, leftover


def fold_linear_input(
    W: Tensor,
    bias: Optional[Tensor],
    Q: Optional[Tensor],
    *,
    pre: Optional[Tensor] = None,
    post: Optional[Tensor] = None,
    compute: torch.dtype = torch.float64,
) -> tuple[Tensor, Optional[Tensor]]:
    """Fold the input transform `x = (x̃ + pre) @ Q + post` into `z = x @ W + bias` (`W [K, N]`).

    `z = x̃ @ (Q W) + ((pre @ Q + post) @ W + bias)`. `Q` None means identity. Returns `(W', bias')`; `bias'` is None
    only when there was no bias and no shift.
    """
    w, b, q = _t64(W, compute), _t64(bias, compute), _t64(Q, compute)
    new_w = w if q is None else _apply_left(q, w)
    shift = None
    if pre is not None:
        shift = _t64(pre, compute) if q is None else _apply_right(_t64(pre, compute), q)
    if post is not None:
        shift = _t64(post, compute) if shift is None else shift + _t64(post, compute)
    if shift is not None:
        b = shift @ w + (b if b is not None else 0.0)
    return _f32(new_w), _f32(b)


def fold_linear_output(W: Tensor, bias: Optional[Tensor], B: Tensor, *,
                       compute: torch.dtype = torch.float64) -> tuple[Tensor, Optional[Tensor]]:
    """Fold the output transform `z' = z @ B` into `z = x @ W + bias`: `W' = W B`, `bias' = bias B`."""
    w, b, m = _t64(W, compute), _t64(bias, compute), _t64(B, compute)
    return _f32(_apply_right(w, m)), _f32(None if b is None else _apply_right(b, m))


def block_diag_heads(blocks: Tensor, repeat: int = 1) -> Tensor:
    """Block-diagonal `[H·repeat·d, H·repeat·d]` matrix from per-head blocks `[H, d, d]`, each block repeated
    `repeat` times in a row (GQA: query head `h` reads KV head `h // repeat`, as HF's `repeat_kv`)."""
    blocks = blocks.repeat_interleave(repeat, dim=0) if repeat > 1 else blocks
    return torch.block_diag(*blocks.unbind(0))


def inverse64(m: Tensor, *, compute: torch.dtype = torch.float64) -> Tensor:
    """Inverse in float64 (a vector is a diagonal: its reciprocal); returned as float32, as stored."""
    m64 = _t64(m, compute)
    inv = 1.0 / m64 if m64.dim() == 1 else torch.linalg.inv(m64)
    return _f32(inv)


def blocks_inverse64(blocks: Tensor, *, compute: torch.dtype = torch.float64) -> Tensor:
    """Per-block float64 inverses of `[H, d, d]`, as float32."""
    return torch.linalg.inv(_t64(blocks, compute)).to(torch.float32)


def is_strictly_diagonally_dominant(m: Tensor, dims: Sequence[int] = (-2, -1)) -> bool:
    """Row-wise strict diagonal dominance `|a_ii| > Σ_{j≠i} |a_ij|` (every matrix of a batch)."""
    a = m.detach().abs().to(torch.float64)
    diag = torch.diagonal(a, dim1=dims[0], dim2=dims[1])
    off = a.sum(dim=dims[1]) - diag
    return bool(torch.all(diag > off))
