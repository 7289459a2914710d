"""Shared fixtures: tiny random-weight HF model folders (with a local tokenizer, no hub access); the helpers they use
are in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import VOCAB, fuzz_seed, make_bpe_tokenizer, make_tokenizer, tiny_model, write_tiny_gguf


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def _seed_line() -> str:
    seed = fuzz_seed()
    return f"fuzz seed: {seed} (the exploring fuzz cases; replay with QCOMPILER_FUZZ_SEED={seed})"


def pytest_report_header(config):
    return _seed_line()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The seed again at the end (pytest -q prints no header), where the session ran exploring fuzz cases."""
    if any("explore" in getattr(r, "nodeid", "") for reps in terminalreporter.stats.values() for r in reps):
        terminalreporter.write_line(_seed_line())


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("QCOMPILER_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or QCOMPILER_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Factory: `tiny_dirs("llama")` → path of a saved tiny model folder (config, safetensors, tokenizer)."""
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{kind}")
            tiny_model(kind).save_pretrained(d)
            (make_bpe_tokenizer() if kind.startswith("qwen2") else make_tokenizer()).save_pretrained(d)
            cache[kind] = d
        return cache[kind]

    return make


# llama.cpp's tensor names for the tiny LLaMA's parameters (the inverse of transformers' GGUF name map)
@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """Factory: `tiny_gguf(tied=False, kind="llama")` → path of the tiny model of `kind` written as a GGUF file
    (tests/helpers.py::write_tiny_gguf; cached per session)."""
    cache: dict[tuple, Path] = {}

    def make(tied: bool = False, kind: str = "llama") -> Path:
        if (tied, kind) not in cache:
            path = tmp_path_factory.mktemp("gguf") / (f"tiny-{kind}-tied.gguf" if tied else f"tiny-{kind}.gguf")
            write_tiny_gguf(path, kind=kind, tied=tied)
            cache[tied, kind] = path
        return cache[tied, kind]

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


