"""Turn a `qcompiler export` folder into a Triton Inference Server model repository (onnxruntime backend).

    python examples/triton/make_repository.py OUT REPO [--name spqr_llm] [--library-path /models/spqr_llm/libqcompiler_ops.so]

writes
    REPO/NAME/config.pbtxt          platform onnxruntime_onnx; every graph input/output with its type and dims
                                    (dynamic dims as -1, max_batch_size 0: the batch dim is part of the shapes);
                                    model_operations { op_library_filename } pointing at the op library
    REPO/NAME/1/model.onnx (+ model.onnx.data)
    REPO/NAME/libqcompiler_ops.so   the op library from OUT

Serve (the repository mounted at /models, so the library path in config.pbtxt resolves inside the container):
    docker run --rm -p8000:8000 -p8001:8001 -v $PWD/REPO:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
        tritonserver --model-repository=/models
The client runs the decode loop (examples/deploy_python.py shows the feeds: input_ids, attention_mask,
position_ids, past_key_values.* → logits, present.*), one request per step. Needs a Triton whose onnxruntime
backend is ORT ≥ 1.21 (the library's API version). Uses only onnx from Python.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import onnx

LIBRARY = "libqcompiler_ops.so"
TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
                onnx.TensorProto.BOOL: "TYPE_BOOL"}


def _tensor_entries(values) -> list[str]:
    entries = []
    for v in values:
        t = v.type.tensor_type
        dims = [str(d.dim_value) if d.HasField("dim_value") else "-1" for d in t.shape.dim]
        entries.append(f'  {{\n    name: "{v.name}"\n    data_type: {TRITON_TYPES[t.elem_type]}\n'
                       f'    dims: [ {", ".join(dims)} ]\n  }}')
    return entries


def config_pbtxt(model: onnx.ModelProto, name: str, library_path: str) -> str:
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
            f"input [\n{(',' + chr(10)).join(_tensor_entries(model.graph.input))}\n]\n"
            f"output [\n{(',' + chr(10)).join(_tensor_entries(model.graph.output))}\n]\n"
            f'model_operations {{ op_library_filename: "{library_path}" }}\n'
            "instance_group [ { kind: KIND_CPU, count: 1 } ]\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a `qcompiler export` output folder")
    p.add_argument("repository", help="model repository folder (created)")
    p.add_argument("--name", default="spqr_llm", help="model name (default: spqr_llm)")
    p.add_argument("--library-path", default=None,
                   help="op library path as the server sees it (default: /models/NAME/libqcompiler_ops.so)")
    p.add_argument("--gpu", action="store_true", help="instance_group KIND_GPU instead of KIND_CPU")
    args = p.parse_args(argv)
    src = Path(args.folder)
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    dst = Path(args.repository) / args.name
    (dst / "1").mkdir(parents=True, exist_ok=True)
    for f in src.glob("model.onnx*"):
        shutil.copy2(f, dst / "1" / f.name)
    if (src / LIBRARY).exists():
        shutil.copy2(src / LIBRARY, dst / LIBRARY)
    text = config_pbtxt(model, args.name, args.library_path or f"/models/{args.name}/{LIBRARY}")
    if args.gpu:
        text = text.replace("KIND_CPU", "KIND_GPU")
    (dst / "config.pbtxt").write_text(text)
    print(f"wrote {dst}/config.pbtxt ({len(model.graph.input)} inputs, {len(model.graph.output)} outputs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
