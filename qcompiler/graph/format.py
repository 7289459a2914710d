"""The `qcompiler::SpQRMatMul` storage format and its NumPy reference decoder.

This module is the single written-down truth of docs/spqr-format.md: packing/unpacking of low-bit codes, the
decoded weight, the reference matmul, and the exact storage cost. Kernels (C++/CUDA) are tested against
`SpQRWeight.matmul`; quantizers build a `SpQRWeight` with `SpQRWeight.from_codes` and use
`SpQRWeight.dequantize` (or the identical torch arithmetic in `qcompiler.quantize.methods.base`) as their evaluated weight.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

DOMAIN = "qcompiler"
OP_TYPE = "SpQRMatMul"
OPSET_VERSION = 1
CHUNK = 32  # codes per packing chunk
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_STAT_BITS = (0, 2, 3, 4)

# Input names in positional order (the node's inputs follow this order; optional ones may be "").
INPUT_NAMES = (
    "X",
    "qweight",
    "scales",
    "zeros",
    "stats2",
    "outlier_row_ptr",
    "outlier_col_idx",
    "outlier_values",
    "perm",
    "bias",
)

#: values of the optional `activation` attribute (docs/spqr-format.md): "" none; "silu_mul": the N rows are a gate
#: half then an up half, Y[..., j] = silu(Z[..., j]) · Z[..., N/2 + j] with Z = X·Wᵀ + bias
ACTIVATIONS = ("", "silu_mul")


def apply_activation(z: np.ndarray, activation: str) -> np.ndarray:
    """Reference of the `activation` attribute on the product `z [..., N]` (computed in fp32, returned in z's dtype)."""
    if activation == "":
        return z
    if activation != "silu_mul":
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if z.shape[-1] % 2:
        raise ValueError(f"activation 'silu_mul' needs an even N, got {z.shape[-1]}")
    f = z.astype(np.float32)
    h = f.shape[-1] // 2
    g, u = f[..., :h], f[..., h:]
    with np.errstate(over="ignore"):  # e^−g = inf for g < −88: silu → −0, as the kernels give
        return (g / (1.0 + np.exp(-g)) * u).astype(z.dtype)


def packed_row_bytes(n_codes: int, bits: int) -> int:
    """Bytes taken by one packed row of `n_codes` codes of width `bits`."""
    return math.ceil(n_codes / CHUNK) * 4 * bits


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes `[R, C]` (values in [0, 2**bits)) into uint8 `[R, ceil(C/32)*4*bits]`.

    Layout per 32-code chunk (see docs/spqr-format.md): 8-bit: byte i = c_i; 4-bit: byte i = c_i | c_{16+i} << 4;
    2-bit: byte i = c_i | c_{8+i} << 2 | c_{16+i} << 4 | c_{24+i} << 6; 3-bit: the 2-bit plane of the low
    two bits followed by a little-endian uint32 whose bit i is bit 2 of c_i.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [rows, cols], got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits: [{codes.min()}, {codes.max()}]")
    rows, cols = codes.shape
    n_chunks = math.ceil(cols / CHUNK)
    padded = np.zeros((rows, n_chunks * CHUNK), dtype=np.uint32)
    padded[:, :cols] = codes
    c = padded.reshape(rows, n_chunks, CHUNK)
    if bits == 8:
        out = c.astype(np.uint8)
    elif bits == 4:
        out = (c[..., :16] | (c[..., 16:] << 4)).astype(np.uint8)
    else:
        low = c & 3
        plane2 = (low[..., 0:8] | (low[..., 8:16] << 2) | (low[..., 16:24] << 4) | (low[..., 24:32] << 6)).astype(
            np.uint8
        )
        if bits == 2:
            out = plane2
        else:
            hi = (c >> 2) & 1
            word = (hi << np.arange(CHUNK, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
            plane1 = word.astype("<u4").view(np.uint8).reshape(rows, n_chunks, 4)
            out = np.concatenate([plane2, plane1], axis=-1)
    return np.ascontiguousarray(out.reshape(rows, n_chunks * 4 * bits))


def unpack_codes(packed: np.ndarray, bits: int, n_codes: int) -> np.ndarray:
    """Inverse of `pack_codes`: uint8 `[R, ceil(C/32)*4*bits]` → uint8 codes `[R, n_codes]`."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    packed = np.asarray(packed, dtype=np.uint8)
    rows = packed.shape[0]
    n_chunks = math.ceil(n_codes / CHUNK)
    if packed.shape != (rows, n_chunks * 4 * bits):
        raise ValueError(f"packed shape {packed.shape} does not match {n_codes} codes of {bits} bits")
    p = packed.reshape(rows, n_chunks, 4 * bits)
    if bits == 8:
        codes = p
    elif bits == 4:
        codes = np.concatenate([p & 15, p >> 4], axis=-1)
    else:
        b = p[..., :8]
        codes = np.concatenate([b & 3, (b >> 2) & 3, (b >> 4) & 3, (b >> 6) & 3], axis=-1)
        if bits == 3:
            word = np.ascontiguousarray(p[..., 8:12]).view("<u4")[..., 0]
            hi = (word[..., None] >> np.arange(CHUNK, dtype=np.uint32)) & 1
            codes = codes | (hi.astype(np.uint8) << 2)
    return np.ascontiguousarray(codes.reshape(rows, n_chunks * CHUNK)[:, :n_codes].astype(np.uint8))


@dataclasses.dataclass
class SpQRWeight:
    """One linear layer in `SpQRMatMul` form. Field shapes follow docs/spqr-format.md.

    Attributes:
        K, N: input / output features.
        bits: weight code width (2-4).
        group_size: β1, columns per first-level group along K (last group may be ragged).
        stat_bits: 0 for fp16 scales/zeros, else their code width (2-4).
        stat_group_size: β2, output rows per second-level statistics group.
        qweight: uint8 `[N, ceil(K/32)*4*bits]`.
        scales, zeros: fp16 `[G, N]`, or uint8 `[G, ceil(N/32)*4*stat_bits]` when stat_bits > 0.
        stats2: fp16 `[G, N2, 4]` (scale_scale, scale_zero, zero_scale, zero_zero), or None.
        outlier_row_ptr: int32 `[N+1]`, outlier_col_idx: uint16 `[nnz]`, outlier_values: fp16 `[nnz]`, or None.
        perm: int32 `[K]` (stored column j multiplies input feature perm[j]), or None.
        bias: float32 `[N]`, or None.
    """

    K: int
    N: int
    bits: int
    group_size: int
    stat_bits: int
    stat_group_size: int
    qweight: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    stats2: Optional[np.ndarray] = None
    outlier_row_ptr: Optional[np.ndarray] = None
    outlier_col_idx: Optional[np.ndarray] = None
    outlier_values: Optional[np.ndarray] = None
    perm: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None

    # ------------------------------------------------------------------ construction
    @property
    def n_groups(self) -> int:
        return math.ceil(self.K / self.group_size)

    @property
    def n_stat_groups(self) -> int:
        return math.ceil(self.N / self.stat_group_size)

    @property
    def nnz(self) -> int:
        return 0 if self.outlier_values is None else int(self.outlier_values.size)

    @classmethod
    def from_codes(
        cls,
        *,
        codes: np.ndarray,
        bits: int,
        group_size: int,
        scales: np.ndarray,
        zeros: np.ndarray,
        stat_bits: int = 0,
        stat_group_size: int = 16,
        stats2: Optional[np.ndarray] = None,
        outliers: Optional[np.ndarray] = None,
        perm: Optional[np.ndarray] = None,
        bias: Optional[np.ndarray] = None,
    ) -> "SpQRWeight":
        """Build from unpacked tensors.

        Args:
            codes: integer `[N, K]` weight codes in stored (permuted) column order.
            scales, zeros: fp16 `[N, G]` when stat_bits == 0, else integer codes `[N, G]`.
            stats2: fp16-representable `[G, N2, 4]` when stat_bits > 0.
            outliers: dense `[N, K]` float array of additive fp16 deltas (0 = no outlier), stored order; the
                nonzero pattern becomes the CSR structure.
            perm: `[K]` ints, or None.
            bias: `[N]`, or None.
        """
        codes = np.asarray(codes)
        N, K = codes.shape
        G = math.ceil(K / group_size)
        scales = np.asarray(scales)
        zeros = np.asarray(zeros)
        if scales.shape != (N, G) or zeros.shape != (N, G):
            raise ValueError(f"scales/zeros must be [N, G] = [{N}, {G}], got {scales.shape} / {zeros.shape}")
        if stat_bits == 0:
            s_store = np.ascontiguousarray(scales.T.astype(np.float16))
            z_store = np.ascontiguousarray(zeros.T.astype(np.float16))
            stats2 = None
        else:
            s_store = pack_codes(scales.T.astype(np.int64), stat_bits)
            z_store = pack_codes(zeros.T.astype(np.int64), stat_bits)
            N2 = math.ceil(N / stat_group_size)
            stats2 = np.asarray(stats2, dtype=np.float16)
            if stats2.shape != (G, N2, 4):
                raise ValueError(f"stats2 must be [G, N2, 4] = [{G}, {N2}, 4], got {stats2.shape}")
        row_ptr = col_idx = values = None
        if outliers is not None:
            outliers = np.asarray(outliers, dtype=np.float32)
            mask = outliers != 0
            if mask.any():
                if K > 65536:
                    raise ValueError(f"outlier column indices are uint16: K={K} > 65536 is not supported")
                rows, cols = np.nonzero(mask)
                counts = np.bincount(rows, minlength=N)
                row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
                col_idx = cols.astype(np.uint16)
                values = outliers[rows, cols].astype(np.float16)
        return cls(
            K=K,
            N=N,
            bits=bits,
            group_size=group_size,
            stat_bits=stat_bits,
            stat_group_size=stat_group_size,
            qweight=pack_codes(codes.astype(np.int64), bits),
            scales=s_store,
            zeros=z_store,
            stats2=stats2,
            outlier_row_ptr=row_ptr,
            outlier_col_idx=col_idx,
            outlier_values=values,
            perm=None if perm is None else np.asarray(perm, dtype=np.int32),
            bias=None if bias is None else np.asarray(bias, dtype=np.float32),
        )

    # ------------------------------------------------------------------ fusing siblings
    @staticmethod
    def concat_refusal(weights: "list[SpQRWeight]") -> Optional[str]:
        """Why `concat(weights)` is impossible (None: it is possible): the same K, bits, group sizes, statistics
        width, permutation and bias presence, and every part but the last a whole number of second-level statistics groups."""
        if len(weights) < 2:
            return "fewer than two weights"
        first = weights[0]
        for w in weights[1:]:
            for field in ("K", "bits", "group_size", "stat_bits", "stat_group_size"):
                if getattr(w, field) != getattr(first, field):
                    return f"{field} differs ({getattr(first, field)} vs {getattr(w, field)})"
            if (w.perm is None) != (first.perm is None) or (w.perm is not None and not np.array_equal(w.perm,
                                                                                                       first.perm)):
                return "the input permutations differ"
            if (w.bias is None) != (first.bias is None):
                return "some have a bias, some not"
        if first.stat_bits and any(w.N % first.stat_group_size for w in weights[:-1]):
            return f"an output count is not a multiple of stat_group_size={first.stat_group_size}"
        return None

    @classmethod
    def concat(cls, weights: "list[SpQRWeight]") -> "SpQRWeight":
        """One weight whose rows are `weights`' rows in order (linears reading the same input, e.g. q/k/v): its
        matmul is theirs concatenated along the last axis, exactly. Raises ValueError with `concat_refusal`'s
        reason."""
        reason = cls.concat_refusal(list(weights))
        if reason is not None:
            raise ValueError(f"cannot concatenate SpQR weights: {reason}")
        first, N = weights[0], sum(w.N for w in weights)
        if first.stat_bits == 0:
            scales = np.concatenate([w.scales for w in weights], axis=1)
            zeros = np.concatenate([w.zeros for w in weights], axis=1)
            stats2 = None
        else:  # codes packed along N in 32-code chunks: unpacked, joined, packed again
            def join(field):
                return pack_codes(np.concatenate([unpack_codes(getattr(w, field), w.stat_bits, w.N).astype(np.int64)
                                                  for w in weights], axis=1), first.stat_bits)
            scales, zeros = join("scales"), join("zeros")
            stats2 = np.concatenate([w.stats2 for w in weights], axis=1)
        row_ptr = col_idx = values = None
        if any(w.nnz for w in weights):
            counts = np.concatenate([np.diff(w.outlier_row_ptr) if w.outlier_row_ptr is not None
                                     else np.zeros(w.N, np.int64) for w in weights])
            row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            col_idx = np.concatenate([w.outlier_col_idx for w in weights if w.nnz]).astype(np.uint16)
            values = np.concatenate([w.outlier_values for w in weights if w.nnz]).astype(np.float16)
        bias = None if first.bias is None else np.concatenate([w.bias for w in weights]).astype(np.float32)
        return cls(K=first.K, N=N, bits=first.bits, group_size=first.group_size, stat_bits=first.stat_bits,
                   stat_group_size=first.stat_group_size, qweight=np.concatenate([w.qweight for w in weights]),
                   scales=scales, zeros=zeros, stats2=stats2, outlier_row_ptr=row_ptr, outlier_col_idx=col_idx,
                   outlier_values=values, perm=first.perm, bias=bias)

    def split(self, sizes: "list[int]") -> "list[SpQRWeight]":
        """The parts of `concat` back: rows `[0, sizes[0])`, then the next `sizes[1]`, ... (sizes sum to N; every
        part but the last a whole number of statistics groups when stat_bits > 0)."""
        if sum(sizes) != self.N or min(sizes) < 1:
            raise ValueError(f"split sizes {sizes} do not partition N={self.N}")
        if self.stat_bits and any(n % self.stat_group_size for n in sizes[:-1]):
            raise ValueError(f"split sizes {sizes} cut a statistics group of {self.stat_group_size} rows")
        parts, start = [], 0
        codes_s = codes_z = None
        if self.stat_bits:
            codes_s = unpack_codes(self.scales, self.stat_bits, self.N).astype(np.int64)
            codes_z = unpack_codes(self.zeros, self.stat_bits, self.N).astype(np.int64)
        for n in sizes:
            rows = slice(start, start + n)
            if self.stat_bits:
                scales, zeros = pack_codes(codes_s[:, rows], self.stat_bits), pack_codes(codes_z[:, rows], self.stat_bits)
                g2 = slice(start // self.stat_group_size, math.ceil((start + n) / self.stat_group_size))
                stats2 = np.ascontiguousarray(self.stats2[:, g2])
            else:
                scales, zeros, stats2 = (np.ascontiguousarray(self.scales[:, rows]),
                                         np.ascontiguousarray(self.zeros[:, rows]), None)
            row_ptr = col_idx = values = None
            if self.outlier_row_ptr is not None:
                lo, hi = int(self.outlier_row_ptr[start]), int(self.outlier_row_ptr[start + n])
                if hi > lo:
                    row_ptr = (self.outlier_row_ptr[start:start + n + 1] - lo).astype(np.int32)
                    col_idx, values = self.outlier_col_idx[lo:hi].copy(), self.outlier_values[lo:hi].copy()
            parts.append(SpQRWeight(K=self.K, N=n, bits=self.bits, group_size=self.group_size,
                                    stat_bits=self.stat_bits, stat_group_size=self.stat_group_size,
                                    qweight=self.qweight[rows].copy(), scales=scales, zeros=zeros, stats2=stats2,
                                    outlier_row_ptr=row_ptr, outlier_col_idx=col_idx, outlier_values=values,
                                    perm=self.perm, bias=None if self.bias is None else self.bias[rows].copy()))
            start += n
        return parts

    # ------------------------------------------------------------------ decoding
    def group_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Decoded first-level (scale, zero), float32 `[N, G]`."""
        G, N = self.n_groups, self.N
        if self.stat_bits == 0:
            return self.scales.astype(np.float32).T.copy(), self.zeros.astype(np.float32).T.copy()
        sc = unpack_codes(self.scales, self.stat_bits, N).astype(np.float32)  # [G, N]
        zc = unpack_codes(self.zeros, self.stat_bits, N).astype(np.float32)
        t = np.arange(N) // self.stat_group_size
        st = self.stats2.astype(np.float32)[:, t, :]  # [G, N, 4]
        s = st[..., 0] * (sc - st[..., 1])
        z = st[..., 2] * (zc - st[..., 3])
        return s.T.astype(np.float32), z.T.astype(np.float32)

    def codes(self) -> np.ndarray:
        """Unpacked weight codes `[N, K]` (stored column order)."""
        return unpack_codes(self.qweight, self.bits, self.K)

    def dequantize_stored(self) -> np.ndarray:
        """Decoded weight `[N, K]` float32 in stored (permuted) column order, outliers added."""
        s, z = self.group_stats()
        g = np.arange(self.K) // self.group_size
        w = s[:, g] * (self.codes().astype(np.float32) - z[:, g])
        if self.outlier_values is not None:
            rows = np.repeat(np.arange(self.N), np.diff(self.outlier_row_ptr))
            w[rows, self.outlier_col_idx.astype(np.int64)] += self.outlier_values.astype(np.float32)
        return w.astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """Decoded weight `[N, K]` float32 in the original input-feature order (`W` of `Y = X Wᵀ + b`)."""
        w = self.dequantize_stored()
        if self.perm is None:
            return w
        out = np.empty_like(w)
        out[:, self.perm] = w
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """Reference `SpQRMatMul`: `x [..., K]` (fp32/fp16) → `[..., N]` in x's dtype, fp32 accumulation."""
        if x.shape[-1] != self.K:
            raise ValueError(f"X last dim {x.shape[-1]} != K={self.K}")
        y = x.astype(np.float32) @ self.dequantize().T
        if self.bias is not None:
            y = y + self.bias.astype(np.float32)
        return y.astype(x.dtype)

    # ------------------------------------------------------------------ accounting / export
    def stored_bits(self) -> dict[str, int]:
        """Bits stored per component (bias excluded), counted from the arrays themselves."""
        parts = {
            "qweight": self.qweight.size * 8,
            "stats": (self.scales.size * self.scales.itemsize + self.zeros.size * self.zeros.itemsize) * 8
            + (0 if self.stats2 is None else self.stats2.size * 16),
            "outliers": 0,
            "perm": 0 if self.perm is None else self.perm.size * 32,
        }
        if self.outlier_values is not None:
            parts["outliers"] = (
                self.outlier_values.size * 16 + self.outlier_col_idx.size * 16 + self.outlier_row_ptr.size * 32
            )
        return parts

    def avg_bits(self) -> float:
        """Average stored bits per weight parameter (bias excluded)."""
        return sum(self.stored_bits().values()) / (self.N * self.K)

    def attributes(self) -> dict[str, int]:
        return {
            "K": self.K,
            "N": self.N,
            "bits": self.bits,
            "group_size": self.group_size,
            "stat_bits": self.stat_bits,
            "stat_group_size": self.stat_group_size,
        }

    def inputs(self, bias_dtype=np.float32) -> list[Optional[np.ndarray]]:
        """Arrays for inputs 1..9 of the node (None = omitted optional input), in `INPUT_NAMES[1:]` order."""
        return [
            self.qweight,
            self.scales,
            self.zeros,
            self.stats2,
            self.outlier_row_ptr,
            self.outlier_col_idx,
            self.outlier_values,
            self.perm,
            None if self.bias is None else self.bias.astype(bias_dtype),
        ]
