"""Tokenizers: GPT-2 against llama.cpp's upstream test cases, chat templates, streaming decode."""

import importlib.util
import json
from pathlib import Path

import pytest

from qsjax.checkpoints.tokenizer import StreamDecoder, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    """Import `scripts/<name>.py` as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fetch_script = load_script("fetch_gpt2_tokenizer")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """GPT-2's tokenizer files: `weights/gpt2-tokenizer/` if fetched, else fetched once into a temp dir."""
    fetched = ROOT / "weights" / "gpt2-tokenizer"
    if all((fetched / name).is_file() for name in fetch_script.OUTPUT_FILES):
        return fetched
    return fetch_script.fetch_gpt2_tokenizer(tmp_path_factory.mktemp("gpt2-tokenizer"))


@pytest.fixture(scope="session")
def upstream_cases(gpt2_dir):
    inp, out = (gpt2_dir / name for name in fetch_script.TEST_FILES)
    return fetch_script.read_test_cases(inp, out)


@pytest.fixture(scope="session", params=["tokenizer.json", "vocab.json+merges.txt"])
def gpt2(request, gpt2_dir):
    return load_tokenizer(gpt2_dir, prefer_json=request.param == "tokenizer.json")


def test_upstream_cases_parse(upstream_cases):
    assert len(upstream_cases) == 46
    assert upstream_cases[0] == ("ied 4 ½ months", [798, 604, 25208, 1933])
    assert ("", []) in upstream_cases
    assert ("Hello world", [15496, 995]) in upstream_cases


def test_upstream_cases_encode_exactly(gpt2, upstream_cases):
    for text, expected in upstream_cases:
        assert gpt2.encode(text, add_special_tokens=False) == expected, repr(text)
    batch = gpt2.encode_batch([text for text, _ in upstream_cases], add_special_tokens=False)
    assert batch == [ids for _, ids in upstream_cases]


def test_upstream_cases_round_trip(gpt2, upstream_cases):
    for text, ids in upstream_cases:
        assert gpt2.decode(ids) == text, repr(text)


def test_gpt2_special_tokens(gpt2):
    assert gpt2.bos_id == 50256 and gpt2.eos_ids == (50256,) and gpt2.pad_id is None
    assert gpt2.add_bos is False and gpt2.vocab_size == 50257
    assert gpt2.encode("Hello") == [15496]
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert gpt2.decode([64, 50256, 65]) == "ab"
    assert gpt2.decode([64, 50256, 65], skip_special_tokens=False) == "a<|endoftext|>b"


def test_vocab_files_match_openai_layout(gpt2_dir):
    vocab = json.loads((gpt2_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50257 and vocab["!"] == 0 and vocab["<|endoftext|>"] == 50256
    assert vocab["\u0120the"] == 262
    merges = (gpt2_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "\u0120 t" and len(merges) == 50001


def stream(tokenizer, ids) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    return pieces + [decoder.flush()]


def test_stream_decoder_matches_full_decode(gpt2, upstream_cases):
    for text, ids in upstream_cases:
        pieces = stream(gpt2, ids)
        assert "".join(pieces) == gpt2.decode(ids) == text
        assert not any("\ufffd" in piece for piece in pieces[:-1]) or "\ufffd" in text


def test_stream_decoder_holds_back_split_characters(gpt2):
    text = "🦊 fox ünï 日本"
    ids = gpt2.encode(text)
    assert any("\ufffd" in gpt2.decode([i]) for i in ids)  # some character spans several tokens
    pieces = stream(gpt2, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces[-1] == ""  # nothing left over


def test_stream_decoder_flushes_incomplete_tail(gpt2):
    ids = gpt2.encode("a🦊")[:-1]  # cut inside the emoji's bytes
    decoder = StreamDecoder(gpt2)
    assert "".join(decoder.push(i) for i in ids) == "a"
    assert decoder.flush().endswith("\ufffd")


def write_tokenizer_dir(path: Path, gpt2_dir: Path, **tokenizer_config) -> Path:
    """A model directory with GPT-2's tokenizer.json and the given tokenizer_config.json."""
    path.mkdir()
    (path / "tokenizer.json").write_bytes((gpt2_dir / "tokenizer.json").read_bytes())
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def test_add_bos_token_is_respected(tmp_path, gpt2_dir):
    model_dir = write_tokenizer_dir(tmp_path / "m", gpt2_dir, bos_token="<|endoftext|>", add_bos_token=True)
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.add_bos and tokenizer.bos_id == 50256
    assert tokenizer.encode("Hello") == [50256, 15496]
    assert tokenizer.encode("Hello", add_special_tokens=False) == [15496]


def test_special_ids_prefer_generation_config(tmp_path, gpt2_dir):
    model_dir = write_tokenizer_dir(tmp_path / "m", gpt2_dir, eos_token="<|endoftext|>")
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": 13, "pad_token_id": 0}))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [11, 12]}))
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.eos_ids == (11, 12) and tokenizer.pad_id == 0 and tokenizer.bos_id is None


def test_chat_template(tmp_path, gpt2_dir):
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    model_dir = write_tokenizer_dir(tmp_path / "m", gpt2_dir, bos_token="<|endoftext|>", chat_template=template)
    tokenizer = load_tokenizer(model_dir)
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages) == "<|endoftext|>user: Hi\nassistant:"
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == "<|endoftext|>user: Hi\n"


def test_chat_template_from_jinja_file(tmp_path, gpt2_dir):
    model_dir = write_tokenizer_dir(tmp_path / "m", gpt2_dir)
    (model_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_tokenizer(model_dir).apply_chat_template([{"role": "user", "content": "Hi"}]) == "Hi"


def test_no_chat_template_is_a_clear_error(gpt2):
    with pytest.raises(ValueError, match="no chat template"):
        gpt2.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
