"""`qcompiler` command line: export, eval, generate, inspect.

Method flags are generated from each registered method's Config dataclass (field `group_size` → `--group-size`),
so a new method gets its flags without touching this file. Errors the user can fix print one line on stderr and
exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
import sys
import typing
from typing import Any, Optional, Sequence

from qcompiler import QCompilerError, __version__

DATA_HELP = "$QCOMPILER_DATA/{name}, else ../shared/data/{name} (from the working directory or the checkout)"


def _method_fields() -> dict[str, list[dataclasses.Field]]:
    from qcompiler.quantize.methods import available_methods, get_method

    return {name: list(dataclasses.fields(get_method(name).Config)) for name in available_methods()}


def _field_type(field: dataclasses.Field):
    t = field.type
    if isinstance(t, str):
        t = {"int": int, "float": float, "bool": bool, "str": str}.get(t.split("|")[0].strip(), str)
    origin = typing.get_origin(t)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        t = args[0] if args else str
    return t if t in (int, float, bool, str) else str


def _add_method_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Add one flag per Config field of any method; returns {dest: flag}."""
    group = parser.add_argument_group("method options (each applies to the methods whose config has it)")
    by_name: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for method, fields in _method_fields().items():
        for f in fields:
            by_name.setdefault(f.name, []).append((method, f))
    dests: dict[str, str] = {}
    for name, users in by_name.items():
        f = users[0][1]
        flag = "--" + name.replace("_", "-")
        t = _field_type(f)
        help_text = (f.metadata or {}).get("help", "")
        # each method has its own default for a shared flag (e.g. --group-size: rtn 128, spqr 16): list them all
        defaults = ", ".join(f"{m} {fld.default}" for m, fld in users if fld.default is not dataclasses.MISSING)
        help_text = f"{help_text} (default: {defaults})"
        if t is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=t, default=None, help=help_text)
        dests[name] = flag
    return dests


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcompiler", description="Export low-bit quantized LLMs to ONNX.")
    p.add_argument("--version", action="version", version=f"qcompiler {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="quantize a model and export it to an ONNX folder")
    from qcompiler.models.families import supported_model_types

    e.add_argument("model", help="local HF folder, .gguf file, or hub id; its config's model_type must be one of "
                                 f"{', '.join(supported_model_types())}")
    e.add_argument("-o", "--output", required=True, help="output folder (model.onnx, tokenizer, quant_config.json)")
    e.add_argument("--method", default="rtn", help="quantization method (default: rtn; see --help for the list)")
    e.add_argument("--preset", default=None,
                   help="named settings of the method, overridden by explicit flags (spqr: near-lossless = the "
                        "defaults, sub4 = 3-bit codes under 3.9 bits/param)")
    e.add_argument("--force", action="store_true", help="replace an existing output folder")
    e.add_argument("--lm-head", default="auto", choices=("auto", "keep", "rtn", "gptq"),
                   help="quantize the output projection too (a tied embedding's lookup then reads the same quantized "
                        "table): rtn = min-max round-to-nearest (8-bit by default: lossless on SmolLM2, "
                        "docs/methods.md), gptq = GPTQ calibrated on the final hidden states of the "
                        "calibration windows (4-bit by default), with --lm-head-bits / --lm-head-group-size; "
                        "keep = at the export dtype (default: auto = rtn for --method spqr with 4-bit codes, where "
                        "it was measured lossless and faster; keep for the rest and for --dtype fp16)")
    e.add_argument("--lm-head-bits", type=int, default=None,
                   help="lm_head code width: 2, 3, 4 or 8 (default: 8 for rtn, lossless; 4 for gptq)")
    e.add_argument("--lm-head-group-size", type=int, default=None,
                   help="lm_head input features per scale/zero group (default: 128 for 8-bit codes, else 32)")
    e.add_argument("--lm-head-nsamples", type=int, default=16,
                   help="--lm-head gptq after rtn/none: calibration windows for its Hessian, the first of --nsamples "
                        "(default: 16; each costs a forward of the whole model; after gptq/spqr the decoder's "
                        "calibration gives it over all windows)")
    e.add_argument("--lm-head-act-order", action="store_true",
                   help="--lm-head gptq: columns by decreasing Hessian diagonal (a tied embedding then keeps a float "
                        "table: the lookup cannot read a permuted one)")
    e.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="activations/unquantized weights of the graph: fp32 (CPU default) or fp16 (GPU deployment)")
    cal = e.add_argument_group("calibration (methods that need data)")
    cal.add_argument("--calibration", default=None,
                     help="calibration text file (default: "
                     + DATA_HELP.format(name="wikitext2/valid.tokens.txt") + ")")
    cal.add_argument("--nsamples", type=int, default=128, help="calibration windows (default: 128)")
    cal.add_argument("--seqlen", type=int, default=2048, help="calibration window length (default: 2048)")
    cal.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default: 0)")
    cal.add_argument("--device", default="auto",
                     help="where calibration and the solvers run, one decoder layer at a time: cpu, cuda, cuda:N, or "
                          "auto (default: the first CUDA device PyTorch sees, else the CPU; affinequant: the CPU)")
    adv = e.add_argument_group("advanced")
    adv.add_argument("--verify-each", action="store_true", help="run onnx.checker and pass postconditions after each pass")
    adv.add_argument("--dump-dir", default=None, help="write the graph after each pass to this folder")
    adv.add_argument("--no-validate", dest="validate", action="store_false",
                     help="skip the ONNX Runtime vs PyTorch logits check after export")
    adv.add_argument("--atol", type=float, default=None,
                     help="validation accepts max |Δlogit| ≤ atol + rtol · max |logit| (default: 1e-3; fp16: 0.05)")
    adv.add_argument("--rtol", type=float, default=None,
                     help="relative part of the validation tolerance, see --atol (default: 1e-4, 1e-3 for methods "
                          "with learned transforms: affinequant, affinequant+spqr; fp16: 0.01)")
    adv.add_argument("--accuracy-level", type=int, choices=(0, 4), default=None,
                     help="4: SpQRMatMul may quantize its input to int8 per 32 (β1 = 16: 16) columns on CPUs with "
                          "AVX512-VNNI or AVX2 (faster decode, some accuracy cost: docs/kernels.md); 0: fp32 "
                          "activations; validation runs at level 0 (default: 4 for --method spqr with 4-bit codes, "
                          "where its measured perplexity cost is under 0.5 %%, else 0)")
    adv.add_argument("--no-fallback", dest="fallback", action="store_false",
                     help="omit the portable ONNX functions that let the model run without the op library")
    adv.add_argument("--no-contrib-ops", dest="contrib_ops", action="store_false",
                     help="standard ONNX ops only besides SpQRMatMul: keep each rotary embedding as exported instead of "
                          "ONNX Runtime's com.microsoft::RotaryEmbedding (slower decode in ONNX Runtime)")
    adv.add_argument("--offload-weights", action="store_true",
                     help="keep the fp32 weights in a temporary file-backed mapping (local safetensors folders or "
                          "GGUF files): memory needs about one decoder layer instead of the whole model, at disk "
                          "speed (QCOMPILER_OFFLOAD_DIR: where the file goes; default: the system temp folder)")
    adv.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                     help="start even if the estimated peak memory exceeds what is available")
    adv.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    e.set_defaults(_method_flags=_add_method_flags(e))

    v = sub.add_parser("eval", help="perplexity of an exported folder (ONNX Runtime + op library, or PyTorch)")
    v.add_argument("folder", help="folder written by `qcompiler export`")
    v.add_argument("--dataset", default=None,
                   help="text or JSON rows (default: " + DATA_HELP.format(name="wikitext2/test_rows.json") + ")")
    v.add_argument("--seqlen", type=int, default=2048, help="window length (default: 2048)")
    v.add_argument("--max-windows", type=int, default=None, help="evaluate only the first M windows")
    v.add_argument("--backend", choices=("ort", "torch"), default="ort",
                   help="ort: the exported model in ONNX Runtime; torch: the same fake-quant weights in PyTorch")
    v.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider")
    v.add_argument("--model", default=None, help="(torch backend) source model, if it moved since export")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    g = sub.add_parser("generate", help="generate text from an exported folder (ONNX Runtime + op library)")
    g.add_argument("folder", help="folder written by `qcompiler export`")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default: 0, all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0, off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider")
    g.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")

    i = sub.add_parser("inspect", help="per-layer table of an exported folder (shape, bits/param, outliers, bytes)")
    i.add_argument("folder", help="folder written by `qcompiler export` (or a model.onnx)")
    i.add_argument("--limit", type=int, default=None, help="show only the first N nodes (totals cover all)")
    i.add_argument("--netron", action="store_true", help="also serve the graph with Netron (until Ctrl-C)")
    i.add_argument("--port", type=int, default=8080, help="Netron port (default: 8080)")
    i.add_argument("--screenshot", default=None, metavar="PNG",
                   help="save a Netron screenshot with a SpQRMatMul node selected (headless Chromium)")
    return p


def _cmd_export(args: argparse.Namespace) -> int:
    from qcompiler.quantize.methods import get_method
    from qcompiler.pipeline import export

    method_cls = get_method(args.method)
    accepted = {f.name for f in dataclasses.fields(method_cls.Config)}
    options: dict[str, Any] = {}
    if args.preset is not None:
        presets = getattr(method_cls, "presets", {})
        if args.preset not in presets:
            known = ", ".join(presets) or "none"
            raise QCompilerError(f"--method {args.method} has no preset {args.preset!r} (presets: {known})")
        options.update(presets[args.preset])
    for dest, flag in args._method_flags.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if dest not in accepted:
            raise QCompilerError(f"{flag} does not apply to --method {args.method}")
        options[dest] = value
    export(
        args.model,
        output=args.output,
        method=args.method,
        method_options=options,
        force=args.force,
        calibration=args.calibration,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        device=args.device,
        verify_each=args.verify_each,
        dump_dir=args.dump_dir,
        validate=args.validate,
        atol=args.atol,
        rtol=args.rtol,
        dtype=args.dtype,
        accuracy_level=args.accuracy_level,
        memory_check=args.memory_check,
        offload_weights=args.offload_weights,
        fallback=args.fallback,
        contrib_ops=args.contrib_ops,
        lm_head=_lm_head_config(args),
        quiet=args.quiet,
    )
    return 0


def _lm_head_config(args: argparse.Namespace):
    if args.lm_head == "keep":
        if args.lm_head_bits is not None or args.lm_head_group_size is not None:
            raise QCompilerError("--lm-head-bits / --lm-head-group-size need --lm-head rtn or gptq (--lm-head keep "
                                 "keeps the table)")
        return None
    from qcompiler.quantize.lm_head import LMHeadConfig

    return LMHeadConfig(method=args.lm_head, bits=args.lm_head_bits, group_size=args.lm_head_group_size,
                        nsamples=args.lm_head_nsamples, act_order=args.lm_head_act_order)


def _cmd_eval(args: argparse.Namespace) -> int:
    from qcompiler.runtime.evaluate import evaluate_folder

    ppl = evaluate_folder(
        args.folder,
        dataset=args.dataset,  # None: the default data file (qcompiler.data), after the folder is checked
        seqlen=args.seqlen,
        max_windows=args.max_windows,
        backend=args.backend,
        provider=args.provider,
        model_override=args.model,
        progress=not args.quiet,
    )
    print(f"perplexity ({args.backend}, seqlen {args.seqlen}): {ppl:.4f}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from qcompiler.runtime.generate import Generator, SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    gen = Generator(args.folder, provider=args.provider, threads=args.threads)
    prompt_ids = gen.encode(args.prompt, chat=args.chat)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    result = gen.generate(prompt_ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                          stop_at_eos=not args.ignore_eos, on_text=lambda t: print(t, end="", flush=True))
    print(flush=True)
    print(f"[{len(result.prompt_ids)} prompt tokens: {result.prefill_tokens_per_s:.1f} tok/s prefill; "
          f"{len(result.token_ids)} new tokens: {result.decode_tokens_per_s:.1f} tok/s decode"
          + ("; stopped at end of sequence" if result.stopped_at_eos else "") + "]", file=sys.stderr)
    print(f"[{gen.describe()}]", file=sys.stderr)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from qcompiler.tools.inspect import deployment_summary, inspect_model, render

    layers, metadata, total = inspect_model(args.folder)
    print(render(layers, metadata, total, limit=args.limit))
    print("\n".join(deployment_summary(args.folder)))
    if args.screenshot:
        from qcompiler.tools.netron_view import screenshot

        screenshot(args.folder, args.screenshot, port=args.port + 1)
        print(f"wrote {args.screenshot}")
    if args.netron:
        from qcompiler.tools.netron_view import serve

        host, port = serve(args.folder, port=args.port)
        print(f"Netron: http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def _terminate_as_interrupt() -> None:
    """SIGTERM (e.g. `kill`, a job scheduler) unwinds like Ctrl-C, so `atomic_output` removes its temporary folder
    and no half-written output is left (main thread only; a no-op elsewhere)."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        parser = build_parser()
    except QCompilerError as e:  # a broken method registration
        print(f"qcompiler: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    _terminate_as_interrupt()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "inspect":
            return _cmd_inspect(args)
    except QCompilerError as e:
        print(f"qcompiler: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - pass failures etc.: one line, details with -v
        from qcompiler.passes import PassError

        if not isinstance(e, PassError) or args.verbose:
            raise
        print(f"qcompiler: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompiler: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
