"""Stage 3, the ONNX graph layer: the torch.onnx export with the KV cache (`export`, `export_affine`), the SpQR
storage format (`format`) and the `qcompiler::SpQRMatMul` node built from it (`onnx_op`) with its portable ONNX
function (`fallback`), the activation fake-quant function (`actquant`), the fold arithmetic shared with the
quantizers (`fold`), tensors whose bytes stay in a file (`external`) and the graph-editing helpers of the passes
(`edit`). The passes (top-level `passes/`, installed as `qcompiler.passes`) import only this layer."""
