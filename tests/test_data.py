"""Reading evaluation text: .txt, .jsonl, .jsonl.gz, named data sets, and the errors."""

import gzip
import json

import pytest

from qsjax.runtime.cli import UsageError
from qsjax.evaluation.data import DATASETS, SHIPPED, SHIPPED_DIR, DataError, read_text, resolve_data, tokenize

DOCS = ["First document.\nWith two lines.", "Second — ünïcode", " third "]


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def test_txt_is_read_as_is(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"one\r\ntwo\n\n = x = \n")
    assert read_text(path) == "one\ntwo\n\n = x = \n"  # universal newlines, nothing else changed


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_jsonl_documents_joined_in_order(tmp_path, suffix):
    opener = gzip.open if suffix.endswith(".gz") else open
    records = [{"text": d, "url": f"u{i}"} for i, d in enumerate(DOCS)]
    path = write_jsonl(tmp_path / f"docs{suffix}", records, opener)
    assert read_text(path) == "\n\n".join(DOCS)


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert read_text(path) == "a\n\nb"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "a"}\n{"url": "x"}\n', 'line 2: expected an object with a string field "text"'),
        ('{"text": 3}\n', 'line 1: expected an object with a string field "text"'),
        ('["text"]\n', "line 1: expected an object"),
        ('{"text": "a"}\n{"text": \n', "line 2: not JSON"),
    ],
)
def test_bad_jsonl(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_text(path)


def test_errors_are_usage_errors(tmp_path):
    assert issubclass(DataError, UsageError)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no text"):
        read_text(empty)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_text(latin1)
    not_gzip = tmp_path / "x.jsonl.gz"
    not_gzip.write_text('{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="cannot read"):
        read_text(not_gzip)
    with pytest.raises(DataError, match="not found"):
        resolve_data(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="not a file"):
        resolve_data(str(tmp_path))


def test_named_data_sets(tmp_path, monkeypatch):
    """A name reads $QSJAX_DATA's copy when it has one, else the copy shipped in the package,
    whose SHA-256 is checked."""
    (tmp_path / "wikitext103").mkdir()
    (tmp_path / "wikitext103" / "test.txt").write_text("wiki", encoding="utf-8")
    monkeypatch.setenv("QSJAX_DATA", str(tmp_path))
    assert resolve_data("wikitext103") == tmp_path / DATASETS["wikitext103"]
    shipped = resolve_data("c4")
    assert shipped == SHIPPED_DIR / SHIPPED["c4"][0] and shipped.is_file()
    monkeypatch.delenv("QSJAX_DATA")
    wiki = read_text(resolve_data("wikitext103"))
    assert wiki.startswith("\n\n = Robert Boulter = \n") and len(wiki) > 1_000_000


def test_shipped_data_checksum(tmp_path, monkeypatch):
    corrupt = tmp_path / SHIPPED["wikitext103"][0]
    corrupt.write_bytes(gzip.compress(b"not wikitext"))
    monkeypatch.setattr("qsjax.evaluation.data.SHIPPED_DIR", tmp_path)
    with pytest.raises(DataError, match="corrupt"):
        read_text(resolve_data("wikitext103"))


def test_bom_crlf_and_error_offsets(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfone\r\ntwo")
    assert read_text(bom) == "one\ntwo"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "a"}\n' * 3000 + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"byte 42013, line 3001"):
        read_text(bad)


@pytest.mark.parametrize("name", ["doc.json", "doc.json.gz"])
def test_json_document_refused(tmp_path, name):
    (tmp_path / name).write_text('{"text": "a"}', encoding="utf-8")
    with pytest.raises(DataError, match="jsonl"):
        resolve_data(str(tmp_path / name))


def test_corrupt_gzip_stream(tmp_path):
    data = gzip.compress(b'{"text": "hello"}\n' * 1000)
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(data[:20] + bytes(b ^ 0x55 for b in data[20:60]) + data[60:])
    with pytest.raises(DataError, match="cannot read"):
        read_text(path)


class FakeTokenizer:
    def encode(self, text, add_special_tokens=True):
        return ([0] if add_special_tokens else []) + [ord(c) for c in text]


def test_tokenize_once_then_truncate():
    ids = tokenize(FakeTokenizer(), "abc")
    assert ids.tolist() == [0, 97, 98, 99] and ids.dtype.name == "int32"
    assert tokenize(FakeTokenizer(), "abc", max_tokens=2).tolist() == [0, 97]
