"""GGUF SentencePiece vocabularies (llama.cpp's "llama" tokenizer model: Llama 2, Mistral, Gemma,
Phi-3): a tiny byte-fallback BPE trained with `tokenizers`, written into a GGUF as llama.cpp writes
one (tokens, scores instead of merges, token types, byte tokens "<0x0A>"), rebuilt by
`gguf_file.build_tokenizer`, and compared with the trained tokenizer; and an unknown tokenizer model
refused by name."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import pytest
from test_convert import write_tiny_llama
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from qsjax.checkpoints import gguf_file

SPACE = "\u2581"
SPECIALS = ["<unk>", "<s>", "</s>"]  # llama.cpp token types 2, 3, 3
USER_DEFINED = "<start_of_turn>"  # type 4
BYTES = [f"<0x{b:02X}>" for b in range(256)]  # type 6
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "hello world, the capital of France is Paris!",
    "Hello there. The weather in Paris is lovely today; the fox agrees.",
    "  indented text\nwith new lines\n\nand tabs\there",
]
TEXTS = [
    *CORPUS,
    " leading space, then   three spaces",
    "ünïcödé needs byte fallback: 日本語 🦊\n",
    f"{USER_DEFINED}user\nhello world<s>the fox",
    "",
]


def normalizer(prefix: bool):
    return normalizers.Sequence([normalizers.Prepend(SPACE)] * prefix + [normalizers.Replace(" ", SPACE)])


def train_sentencepiece_bpe(prefix: bool):
    """(tokens, scores, merges): a tiny SentencePiece-style BPE in llama.cpp's vocabulary order."""
    trainer_model = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    trainer_model.normalizer = normalizer(prefix)
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=400, limit_alphabet=30, show_progress=False)
    trainer_model.train_from_iterator(CORPUS * 5, trainer)
    state = json.loads(trainer_model.to_str())["model"]
    merges = [tuple(pair) for pair in state["merges"]]
    merged = [left + right for left, right in merges]
    alphabet = [token for token in sorted(state["vocab"], key=state["vocab"].get) if token not in merged]
    tokens = SPECIALS + [USER_DEFINED] + BYTES + alphabet + merged
    # SentencePiece's scores: a merged piece scores minus its merge rank, the alphabet below all of them
    scores = [0.0] * (len(SPECIALS) + 1 + len(BYTES)) + [-float(len(merges) + i) for i in range(len(alphabet))]
    scores += [-float(rank) for rank in range(len(merges))]
    return tokens, scores, merges


def reference_tokenizer(tokens, merges, prefix: bool) -> Tokenizer:
    """The trained BPE itself (its own merges), with SentencePiece's normalizer, decoder and BOS."""
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizer(prefix)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                          + [decoders.Strip(" ", 1, 0)] * prefix)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tokenizer.add_tokens([AddedToken(USER_DEFINED, normalized=False)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return tokenizer


def write_vocabulary(path, tokens, scores, *, prefix: bool, model: str = "llama") -> dict:
    """A GGUF holding only a vocabulary as llama.cpp's converter writes one; its metadata."""
    kinds = {"<unk>": 2, "<s>": 3, "</s>": 3, USER_DEFINED: 4, **dict.fromkeys(BYTES, 6)}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types([kinds.get(token, 1) for token in tokens])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_space_prefix(prefix)  # add_bos_token left out: llama.cpp's default for "llama" adds it
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_file.read_metadata(gguf.GGUFReader(path))


@pytest.mark.parametrize("prefix", [True, False], ids=["llama-prefix-space", "gemma-no-prefix"])
def test_sentencepiece_vocabulary_matches_trained_bpe(tmp_path, prefix):
    tokens, scores, merges = train_sentencepiece_bpe(prefix)
    meta = write_vocabulary(tmp_path / "vocab.gguf", tokens, scores, prefix=prefix)
    converted = Tokenizer.from_str(gguf_file.build_tokenizer(meta).to_str())  # what tokenizer.json holds
    reference = reference_tokenizer(tokens, merges, prefix)
    assert converted.get_vocab_size() == len(tokens)
    for text in TEXTS:
        expected = reference.encode(text).ids
        assert converted.encode(text).ids == expected, text
        assert converted.decode(expected) == reference.decode(expected), text
        if USER_DEFINED not in text:  # a prefix space follows every added token, as in llama.cpp
            assert converted.decode(expected) == text, text
        assert converted.decode(expected, skip_special_tokens=False) == reference.decode(expected, skip_special_tokens=False)
    fallback = converted.encode("日", add_special_tokens=False).tokens
    assert fallback[-3:] == ["<0xE6>", "<0x97>", "<0xA5>"]  # the test does exercise byte fallback
    config = gguf_file.tokenizer_config(meta, 64)
    assert (config["bos_token"], config["unk_token"], config["add_bos_token"]) == ("<s>", "<unk>", True)


def test_unknown_tokenizer_model_is_refused(tmp_path):
    with pytest.raises(gguf_file.GGUFError, match="tokenizer model 'bert' is not supported"):
        gguf_file.build_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    path = tmp_path / "bert.gguf"
    write_tiny_llama(path)
    field = gguf.GGUFReader(path, "r+").fields["tokenizer.ggml.model"]
    field.parts[field.data[0]][:] = list(b"bert")  # "gpt2" -> "bert", same length, in place
    result = subprocess.run([sys.executable, "-m", "qsjax.convert", str(path), str(tmp_path / "out")],
                            capture_output=True, check=False, text=True)
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert result.stderr.startswith("error: ") and "'bert'" in result.stderr and result.stderr.count("\n") == 1
