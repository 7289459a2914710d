"""Shared fixtures: tiny random-weight HF model folders (with a local tokenizer, no hub access)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
VOCAB = 128


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("QCOMPILER_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or QCOMPILER_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def make_tokenizer(vocab_size: int = VOCAB):
    """A word-level tokenizer built locally (the hub is unreachable)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(kind: str):
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    if kind == "llama":
        return LlamaConfig(intermediate_size=96, num_key_value_heads=2, **common)
    if kind == "qwen2":
        return Qwen2Config(intermediate_size=96, num_key_value_heads=2, **common)
    if kind == "mistral":
        return MistralConfig(intermediate_size=96, num_key_value_heads=2, **common)
    if kind == "opt":
        return OPTConfig(ffn_dim=96, word_embed_proj_dim=64, **common)
    raise ValueError(kind)


def tiny_model(kind: str, seed: int = 0):
    """A tiny random model in eval mode; biases and norms randomized so nothing is trivially zero/one."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
            elif p.ndim == 1:  # norm weights
                p.uniform_(0.8, 1.2)
    return model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Factory: `tiny_dirs("llama")` → path of a saved tiny model folder (config, safetensors, tokenizer)."""
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{kind}")
            tiny_model(kind).save_pretrained(d)
            make_tokenizer().save_pretrained(d)
            cache[kind] = d
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A small text file in the tiny tokenizer's vocabulary (for eval/calibration in tests)."""
    import random

    rng = random.Random(0)
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(" ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(3000)))
    return p


@pytest.fixture(scope="session")
def tiny_export(tiny_dirs, tmp_path_factory):
    """Factory: `tiny_export("llama", "rtn", "--bits", "3", "--group-size", "16")` → folder of `qcompiler export`
    on the tiny model with those flags (exported once per session and flag set)."""
    from qcompiler.cli import main

    cache: dict[tuple, Path] = {}

    def make(kind: str, method: str, *flags: str) -> Path:
        key = (kind, method, *flags)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"export-{kind}-{method}") / "out"
            code = main(["export", str(tiny_dirs(kind)), "--method", method, *flags, "-o", str(out), "-q"])
            assert code == 0, f"export {key} failed"
            cache[key] = out
        return cache[key]

    return make


def load_bench_script(name: str):
    """Context manager yielding `bench/<name>.py` imported as a module (registered while in use: dataclasses look
    their module up while the file executes)."""
    import contextlib
    import importlib.util
    import sys

    @contextlib.contextmanager
    def loader():
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
            yield module
        finally:
            sys.modules.pop(spec.name, None)

    return loader()


def run_cli(capsys, *argv):
    """`qcompiler ARGV` in process → (exit code, stdout, stderr)."""
    from qcompiler.cli import main

    capsys.readouterr()  # drop what building the arguments printed (e.g. a fixture saving a tiny model)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The CLI's error: exactly one non-empty stderr line, starting with "qcompiler: error: "."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("qcompiler: error: "), lines[0]
    return lines[0]


def assert_no_output(path) -> None:
    assert not path.exists(), f"partial output left behind: {sorted(p.name for p in path.iterdir())}"
