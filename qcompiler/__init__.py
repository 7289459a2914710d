"""qcompiler: export low-bit quantized LLMs (SpQR, AffineQuant, GPTQ, RTN) to ONNX with a SpQRMatMul custom op."""

__version__ = "0.1.0"


class QCompilerError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""
