"""Evaluation text: a plain text file, or documents in JSON lines, read into one string.

    .txt                   the file's text, as is
    .jsonl, .jsonl.gz      one JSON object per line with a string field "text"; the documents
                           are joined with "\\n\\n" in file order (blank lines are skipped)

Two data sets have names (`resolve_data("wikitext103")`): they are looked up under the directory
named by $QSJAX_DATA if it is set, else under `../shared/data/` next to the project root.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np

from qsjax.cli import UsageError

DATASETS = {
    "wikitext103": "wikitext103/test.txt",  # WikiText-103 raw test split, rows joined with "\n\n"
    "c4": "c4/c4_validation_sample.jsonl.gz",  # 1,000 English C4 validation documents
}


class DataError(UsageError):
    """The evaluation text cannot be read: missing, unreadable, not UTF-8, empty or malformed."""


def project_root() -> Path:
    """The directory holding the `qsjax` package (and pyproject.toml)."""
    return Path(__file__).resolve().parent.parent


def data_dirs() -> list[Path]:
    """Where named data sets are looked for, in order."""
    dirs = [Path(os.environ["QSJAX_DATA"])] if os.environ.get("QSJAX_DATA") else []
    return dirs + [project_root().parent / "shared" / "data"]


def resolve_data(arg: str) -> Path:
    """A data set name (see DATASETS) or a file path -> the path of an existing file."""
    if arg in DATASETS:
        for base in data_dirs():
            path = base / DATASETS[arg]
            if path.is_file():
                return path
        raise DataError(
            f"data set {arg!r} not found (looked for {DATASETS[arg]} under "
            f"{', '.join(str(d) for d in data_dirs())}); set QSJAX_DATA to the directory holding "
            f"{DATASETS[arg]}, or pass the file's path to --data"
        )
    path = Path(arg)
    if not path.exists():
        raise DataError(
            f"data file {arg} not found (give a .txt, .jsonl or .jsonl.gz file, or one of: {', '.join(DATASETS)})"
        )
    if not path.is_file():
        raise DataError(f"data path {arg} is not a file")
    return path


def read_text(path: str | Path) -> str:
    """The evaluation text of a .txt, .jsonl or .jsonl.gz file (see the module docstring)."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(".jsonl.gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                text = join_documents(f, path)
        elif name.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                text = join_documents(f, path)
        else:
            text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except (OSError, EOFError) as e:  # missing or unreadable file, a corrupt or truncated gzip stream
        raise DataError(f"cannot read {path}: {e}") from None
    if not text.strip():
        raise DataError(f"{path} holds no text")
    return text


def join_documents(lines, path: Path) -> str:
    """The "text" field of each JSON line, joined with "\\n\\n"."""
    documents = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path} line {number}: expected an object with a string field "text"')
        documents.append(record["text"])
    return "\n\n".join(documents)


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> np.ndarray:
    """Encode the whole text once (BOS only if the tokenizer adds one itself), then keep the first
    `max_tokens` tokens.  -> [N] int32"""
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=True), np.int32)
    return ids if max_tokens is None else ids[:max_tokens]
