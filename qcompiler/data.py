"""Evaluation and calibration text → token windows, following the GPTQ/SpQR reference protocol.

Evaluation (`eval_windows`): the whole text tokenized once (`tokenizer(text, return_tensors="pt")`, default special
tokens), cut into non-overlapping windows of `seqlen`; a trailing remainder shorter than `seqlen` is dropped.
A `.json` file is a list of rows joined with "\\n\\n" (the WikiText-2 test protocol); any other file is read as text.

Calibration (`calibration_windows`): `nsamples` windows of `seqlen` tokens at random starts
`i ∈ [0, T − seqlen − 1]` drawn with `random.Random(seed).randint` (GPTQ's `get_wikitext2`).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Optional

import torch

from qcompiler import QCompilerError

HUB_DATASETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "test")}

# The default data files (../shared/data/README.md): WikiText-2 test rows for perplexity, validation text for
# calibration, as paths under the data folder.
DATA_ENV = "QCOMPILER_DATA"
EVAL_FILE = "wikitext2/test_rows.json"
CALIBRATION_FILE = "wikitext2/valid.tokens.txt"


def data_dirs() -> list[Path]:
    """Folders the default data files are looked for in, in order: `$QCOMPILER_DATA` alone when it is set; otherwise
    `../shared/data` from the working directory, then `../shared/data` beside the source checkout this package runs
    from (so that `qcompiler` started from another folder of an editable install still finds it)."""
    env = os.environ.get(DATA_ENV)
    if env:
        d = Path(env).expanduser()
        if d.is_file():
            raise QCompilerError(f"{DATA_ENV}={env} is a file; it names the data folder (the one holding {EVAL_FILE} "
                                 f"and {CALIBRATION_FILE}); pass a single file with --dataset / --calibration")
        return [d]
    dirs: list[Path] = []
    for d in (Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[2] / "shared" / "data"):
        if d.resolve() not in [x.resolve() for x in dirs]:
            dirs.append(d)
    return dirs


def default_data_file(name: str) -> Optional[Path]:
    """`name` (e.g. `EVAL_FILE`) in the first of `data_dirs()` that has it, or None."""
    for d in data_dirs():
        if (d / name).is_file():
            return d / name
    return None


def missing_data_hint(name: str) -> str:
    """Where `name` was looked for and how to point at it, for error messages."""
    looked = ", ".join(str(d / name) for d in data_dirs())
    return f"set {DATA_ENV} to the folder holding {name} (looked for {looked})"


def require_data_file(name: str, missing: str) -> Path:
    """`default_data_file(name)`, or a QCompilerError "`missing`, or set QCOMPILER_DATA ... (looked for ...)"."""
    found = default_data_file(name)
    if found is None:
        raise QCompilerError(f"{missing}, or {missing_data_hint(name)}")
    return found


def resolve_calibration(method: str, calibration: Optional[str]) -> str:
    """The calibration text of an export: `calibration` if given, else the default file of the data folder, else a
    QCompilerError naming where it was looked for."""
    if calibration is not None:
        return calibration
    return str(require_data_file(CALIBRATION_FILE, f"method '{method}' needs calibration text: pass --calibration PATH"))


def _rows_from_hub(name: str) -> list[str]:
    dataset, subset, split = HUB_DATASETS[name]
    try:
        from datasets import load_dataset

        return list(load_dataset(dataset, subset, split=split)["text"])
    except Exception as e:  # noqa: BLE001 - not installed / no network
        raise QCompilerError(
            f"dataset '{name}' is not a local file and could not be fetched with `datasets` "
            f"({type(e).__name__}); pass a path, e.g. ../shared/data/{EVAL_FILE}"
        ) from e


def load_text(path: str | Path) -> str:
    """The text of `path`: a `.json` list of rows joined with "\\n\\n", or a text file's content. The literal
    name "wikitext2" (no such local file) falls back to the hub via `datasets`."""
    p = Path(path).expanduser()
    if not p.exists():
        if str(path) in HUB_DATASETS:
            return "\n\n".join(_rows_from_hub(str(path)))
        raise QCompilerError(f"text file not found: {path}")
    if not p.is_file():
        raise QCompilerError(f"not a text file: {path}")
    if p.suffix.lower() == ".json":
        try:
            rows = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise QCompilerError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
            raise QCompilerError(f"{path}: expected a JSON list of strings (rows of text)")
        return "\n\n".join(rows)
    return p.read_text(encoding="utf-8")


def load_text_tokens(path: str | Path, tokenizer: Any) -> torch.Tensor:
    """Tokenize the text of `path` once (see `load_text`); returns `LongTensor [1, T]`."""
    text = load_text(path)
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids.to(torch.long)


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: Optional[int] = None) -> list[torch.Tensor]:
    """Non-overlapping windows `[1, seqlen]` of `tokens [1, T]`: `T // seqlen` of them (at most `max_windows`)."""
    if seqlen < 2:
        raise QCompilerError(f"seqlen must be at least 2 (got {seqlen})")
    tokens = tokens.reshape(1, -1)
    n = tokens.shape[1] // seqlen
    if n == 0:
        raise QCompilerError(f"text too short: {tokens.shape[1]} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        if max_windows < 1:
            raise QCompilerError(f"max_windows must be at least 1 (got {max_windows})")
        n = min(n, max_windows)
    return [tokens[:, i * seqlen : (i + 1) * seqlen] for i in range(n)]


def calibration_windows(
    path: str | Path, tokenizer: Any, *, nsamples: int, seqlen: int, seed: int = 0
) -> list[torch.Tensor]:
    """`nsamples` random windows `LongTensor [1, seqlen]` of the tokenized text at `path` (deterministic in `seed`)."""
    if nsamples < 1:
        raise QCompilerError(f"nsamples must be at least 1 (got {nsamples})")
    tokens = load_text_tokens(path, tokenizer)
    return sample_windows(tokens, nsamples=nsamples, seqlen=seqlen, seed=seed, source=str(path))


def sample_windows(
    tokens: torch.Tensor, *, nsamples: int, seqlen: int, seed: int = 0, source: str = "text"
) -> list[torch.Tensor]:
    """Random windows of `tokens [1, T]` as GPTQ samples them: start `i = randint(0, T − seqlen − 1)`."""
    tokens = tokens.reshape(1, -1)
    T = tokens.shape[1]
    if T < seqlen + 1:
        raise QCompilerError(f"{source} is too short for calibration: {T} tokens, need more than seqlen={seqlen}")
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        i = rng.randint(0, T - seqlen - 1)
        out.append(tokens[:, i : i + seqlen].clone())
    return out
