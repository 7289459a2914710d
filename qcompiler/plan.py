"""The pass list, declared in one place: which graph passes run on an export, in which order, from its options.

    fold-affine-into-norm, fold-affine-into-linear   when the method learned transforms (AffineQuant): fold them
    replace-linear                                   each quantized linear → one qcompiler::SpQRMatMul
    embed-from-lm-head                               a quantized lm_head tied to the embedding: the lookup reads it
    quantize-activations                             when the method quantizes activations (w4a4 / w4a8)
    fuse-sibling-linears                             SpQRMatMuls reading one input (q/k/v, gate/up) → one + Split
    fuse-silu-mul                                    gate/up + Split + silu(gate)·up → one SpQRMatMul (its activation)
    rsqrt-as-div                                     RMSNorm in the form ONNX Runtime fuses (standard ops)
    fuse-skip-norm                                   with contrib ops: residual Add + RMSNorm → SkipSimplifiedLayerNormalization
    fuse-rotary                                      with contrib ops and a known max position: com.microsoft::RotaryEmbedding
    fuse-attention-rotary                            with contrib ops: those rotations inside GroupQueryAttention
    drop-identity-reshapes                           head split/join Reshapes that end where they started
    cleanup                                          dead nodes, unused initializers, order, exporter debug metadata
    pack-qkv                                         with contrib ops: attention reads the fused q/k/v unsplit
    add-fallback                                     unless --no-fallback: the portable ONNX function of SpQRMatMul
    set-accuracy-level                               with --accuracy-level 4: int8 activations in the CPU kernel

The passes themselves live in `passes/` (installed as `qcompiler.passes`), one file each.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from qcompiler.passes import (AddFallback, Cleanup, DropIdentityReshapes, EmbedFromLMHead, FoldAffineIntoLinear,
                              FoldAffineIntoNorm, FuseAttentionRotary, FuseRotary, FuseSiblingLinears, FuseSiluMul,
                              FuseSkipNorm, PackQKV, Pass, QuantizeActivations, ReplaceLinear, RsqrtAsDiv, SetAccuracyLevel)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GraphOptions:
    """The export options that decide the pass list (the CLI's --no-fallback, --no-contrib-ops, --accuracy-level)."""

    fallback: bool = True
    contrib_ops: bool = True
    accuracy_level: int = 0


def pass_list(options: GraphOptions, *, result, manifest: dict, max_positions: Optional[int],
              extra_layers: Optional[dict] = None, tied_head: Optional[tuple] = None) -> list[Pass]:
    """The passes for one export. `result`: the method's `QuantizationResult`; `manifest`: the exporter's;
    `max_positions`: the model's `max_position_embeddings` (None: unknown, no rotary fusion); `extra_layers`:
    further linears in SpQRMatMul form (the quantized lm_head), replaced like the method's; `tied_head`:
    `(path, SpQRWeight)` of a quantized lm_head whose table the embedding shares."""
    passes: list[Pass] = []
    plan = result.transforms
    layers = {**result.layers, **(extra_layers or {})}
    if plan is not None:
        passes += [FoldAffineIntoNorm(manifest), FoldAffineIntoLinear(manifest),
                   ReplaceLinear(result.layers, manifest, expected=plan.expected, expected_bias=plan.expected_bias)]
    else:
        passes.append(ReplaceLinear(layers, manifest))
    if tied_head is not None:
        passes.append(EmbedFromLMHead(*tied_head))
    if result.activation_bits < 16:
        passes.append(QuantizeActivations(result.layers, result.activation_bits))
    passes.append(FuseSiblingLinears())
    passes.append(FuseSiluMul())
    passes.append(RsqrtAsDiv())
    if options.contrib_ops:
        passes.append(FuseSkipNorm())
    if options.contrib_ops and max_positions:
        passes += [FuseRotary(int(max_positions)), FuseAttentionRotary()]
    passes.append(DropIdentityReshapes())
    passes.append(Cleanup())
    if options.contrib_ops:  # after cleanup: the bypassed Reshapes' shape computations read q/k/v until then
        passes.append(PackQKV())
    if options.fallback:
        passes.append(AddFallback())
    if options.accuracy_level:
        passes.append(SetAccuracyLevel(options.accuracy_level))
    return passes
