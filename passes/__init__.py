"""ONNX graph-rewrite passes, stage 4 of the pipeline (docs/architecture.md).

This folder sits at the top level of the repository, as the product card names it, and is installed as the
subpackage `qcompiler.passes` by the wheel mapping in pyproject.toml (`[tool.scikit-build.wheel.packages]`
"qcompiler/passes" = "passes"); the editable install maps it the same way, so code always imports
`qcompiler.passes`. Passes import only the graph layer (`qcompiler.graph`: format, op and fallback definitions,
graph-editing helpers) and, for `--verify-each`, the runtime's session (`qcompiler.runtime.ops`) — never the driver
(tests/test_architecture.py checks it). Which passes run, in which order, is declared in one place:
`qcompiler/plan.py`.

Each pass is one small file with one concern; `PassManager` runs them with optional verification
(`verify_each`: onnx.checker + each pass's own postconditions) and dumps (`dump_dir`: the graph after each pass).
"""

from .add_fallback import AddFallback
from .base import Pass, PassContext, PassError, PassManager, PassResult, PipelineResult, run_pass
from .cleanup import Cleanup
from .drop_identity_reshapes import DropIdentityReshapes
from .embed_from_lm_head import EmbedFromLMHead
from .fold_affine_linear import FoldAffineIntoLinear
from .fold_affine_norm import FoldAffineIntoNorm
from .fuse_attention_rotary import FuseAttentionRotary
from .fuse_rotary import FuseRotary
from .fuse_sibling_linears import FuseSiblingLinears
from .fuse_silu_mul import FuseSiluMul
from .fuse_skip_norm import FuseSkipNorm
from .pack_qkv import PackQKV
from .quantize_activations import QuantizeActivations
from .replace_linear import ReplaceLinear
from .rsqrt_as_div import RsqrtAsDiv
from .set_accuracy_level import SetAccuracyLevel

__all__ = [
    "AddFallback",
    "Cleanup",
    "DropIdentityReshapes",
    "EmbedFromLMHead",
    "FoldAffineIntoLinear",
    "FoldAffineIntoNorm",
    "FuseAttentionRotary",
    "FuseRotary",
    "FuseSiblingLinears",
    "FuseSiluMul",
    "FuseSkipNorm",
    "PackQKV",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "PipelineResult",
    "QuantizeActivations",
    "ReplaceLinear",
    "run_pass",
    "RsqrtAsDiv",
    "SetAccuracyLevel",
]
