"""ONNX graph-rewrite passes (installed as `qcompiler.passes`).

Each pass is one small file with one concern; `PassManager` runs them with optional verification
(`verify_each`: onnx.checker + each pass's own postconditions) and dumps (`dump_dir`: the graph after each pass).
"""

from .add_fallback import AddFallback
from .base import Pass, PassContext, PassError, PassManager, PassResult, PipelineResult
from .cleanup import Cleanup
from .fold_affine_linear import FoldAffineIntoLinear
from .fold_affine_norm import FoldAffineIntoNorm
from .fuse_rotary import FuseRotary
from .quantize_activations import QuantizeActivations
from .replace_linear import ReplaceLinear
from .rsqrt_as_div import RsqrtAsDiv
from .set_accuracy_level import SetAccuracyLevel

__all__ = [
    "AddFallback",
    "Cleanup",
    "FoldAffineIntoLinear",
    "FoldAffineIntoNorm",
    "FuseRotary",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "PipelineResult",
    "QuantizeActivations",
    "ReplaceLinear",
    "RsqrtAsDiv",
    "SetAccuracyLevel",
]
