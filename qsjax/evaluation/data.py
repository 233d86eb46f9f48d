"""Evaluation text: a plain text file, or documents in JSON lines, read into one string.

    .jsonl, .jsonl.gz      one JSON object per line with a string field "text"; the documents
                           are joined with "\\n\\n" in file order (blank lines are skipped)
    .json                  refused: a JSON document is not evaluation text (write it as .jsonl)
    anything else          UTF-8 text, as is (decompressed first if the name ends in .gz)

Text is UTF-8; a leading byte-order mark is dropped, line ends are read as "\\n".

Two data sets have names (`resolve_data("wikitext103")`) and ship with qsjax, gzip-compressed in
`qsjax/datasets/` (see its README for their licences), checked against their SHA-256 when read.
If $QSJAX_DATA is set and holds the same relative path (e.g. `wikitext103/test.txt`), that copy is
read instead (an error if it is there but not a readable file).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np

from qsjax.runtime.cli import UsageError

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "datasets"


DATASETS = {
    "wikitext103": "wikitext103/test.txt",  # WikiText-103 raw test split, rows joined with "\n\n"
    "c4": "c4/c4_validation_sample.jsonl.gz",  # 1,000 English C4 validation documents
}
# name -> (the shipped file in qsjax/datasets/, SHA-256 of its uncompressed content)
SHIPPED = {
    "wikitext103": ("wikitext103_test.txt.gz", "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"),
    "c4": ("c4_validation_sample.jsonl.gz", "fcae82e48a686df7cf9b9df2fc9bded988a14a23a65b965e1fe5f2a871dfd90d"),
}


class DataError(UsageError):
    """The evaluation text cannot be read: missing, unreadable, not UTF-8, empty or malformed."""


def resolve_data(arg: str) -> Path:
    """A data set name (see DATASETS) or a file path -> the path of an existing file."""
    if arg in DATASETS:
        if os.environ.get("QSJAX_DATA"):
            path = Path(os.environ["QSJAX_DATA"]) / DATASETS[arg]
            if path.is_file() and os.access(path, os.R_OK):
                return path
            if os.path.lexists(path):  # there, but not a readable file: never fall back to the shipped copy silently
                raise DataError(f"data set {arg!r}: {path} (under $QSJAX_DATA) is not a readable file; fix it or "
                                "remove it to use the copy shipped with qsjax")
        path = SHIPPED_DIR / SHIPPED[arg][0]
        if not path.is_file():
            raise DataError(f"data set {arg!r}: {path} is missing from this qsjax installation; reinstall qsjax")
        return path
    path = Path(arg)
    if not path.exists():
        raise DataError(
            f"data file {arg} not found (give a .txt, .jsonl or .jsonl.gz file, or one of: {', '.join(DATASETS)})"
        )
    if not path.is_file():
        raise DataError(f"data path {arg} is not a file")
    if path.name.lower().endswith((".json", ".json.gz")):
        raise DataError(f"data file {arg} is a .json file; give one JSON object per line as .jsonl, or plain .txt")
    return path


def expected_sha256(path: Path) -> str | None:
    """The SHA-256 a shipped data set's uncompressed content must have (None for any other file)."""
    for file, sha256 in SHIPPED.values():
        if path == SHIPPED_DIR / file:
            return sha256
    return None


def read_bytes(path: Path) -> bytes:
    """The file's content, decompressed if its name ends in .gz."""
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.name.lower().endswith(".gz") else data
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a corrupt or truncated gzip stream
        raise DataError(f"cannot read {path}: {e}") from None


def decode_utf8(data: bytes, what) -> str:
    """UTF-8 bytes -> text, a leading byte-order mark dropped, line ends as "\\n"; a DataError names
    the byte offset (in the uncompressed content) and line of the first invalid byte."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        offset = e.start + bom
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(f"{what} is not UTF-8 text (byte {offset}, line {line}: {e.reason}); re-save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: str | Path) -> str:
    """The evaluation text of a file (see the module docstring)."""
    path = Path(path)
    data = read_bytes(path)
    sha256 = expected_sha256(path)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"{path} is corrupt (its SHA-256 is not the recorded {sha256}); reinstall qsjax")
    text = decode_utf8(data, path)
    if path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        text = join_documents(text.split("\n"), path)
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
