"""GGUF import: a tiny random Llama written with `gguf.GGUFWriter`, converted, and compared with
what transformers makes of the same GGUF file."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGMLType
from safetensors.numpy import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from qsjax import convert

from qsjax.checkpoints import gguf_file as gguf_import

N_LAYERS, D, N_HEAD, N_KV, HEAD_DIM, FF = 2, 64, 4, 2, 16, 256
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "hello world, the capital of France is Paris!",
    "  spaces\tand\ttabs\n\nnew lines 12345 ünïcödé 🦊",
]

# Tensor type of each weight in the synthetic model: every type transformers' GGUF loader also reads.
BLOCK_TYPES = {
    "attn_q": GGMLType.Q4_0,
    "attn_k": GGMLType.Q4_1,
    "attn_v": GGMLType.Q8_0,
    "attn_output": GGMLType.F16,
    "ffn_gate": GGMLType.Q8_0,
    "ffn_up": GGMLType.Q4_0,
    "ffn_down": GGMLType.Q6_K,  # Q4_K in layer 1
}

# K-quants cannot be produced by `gguf.quants.quantize`: we write random blocks and set their
# float16 scale fields (byte offsets within a block) to small values so the weights stay small.
K_QUANT_SCALES = {GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,)}


def random_blocks(rng, rows: int, cols: int, qtype: GGMLType) -> np.ndarray:
    """Random bytes for a `[rows, cols]` tensor of a type gguf cannot quantize to; K-quant scales 1e-4."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in K_QUANT_SCALES.get(qtype, ()):
        blocks[:, offset : offset + 2] = np.array([1e-4], np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // block_size * type_size)


def encode_tensor(rng, w: np.ndarray, qtype: GGMLType):
    """`(data, raw_dtype)` to hand to `GGUFWriter.add_tensor` for a float32 array in `qtype`."""
    if qtype in (GGMLType.F32, GGMLType.F16):
        return gguf.quants.quantize(w, qtype), None
    try:
        return gguf.quants.quantize(w, qtype), qtype
    except NotImplementedError:
        return random_blocks(rng, *w.shape, qtype), qtype


def train_tiny_bpe() -> Tokenizer:
    """A byte-level BPE with ~300 tokens: 3 specials, the 256 byte symbols, a few merges."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXTS * 10, trainer)
    return tokenizer


def write_tiny_llama(path, *, tied=False, override_types=None, seed=0):
    """Write a random 2-layer Llama GGUF the way llama.cpp does (Q/K rows permuted).

    Returns the Hugging Face-layout float32 weights before quantization.
    """
    rng = np.random.default_rng(seed)
    bpe = train_tiny_bpe()
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIALS else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def add(name, w, qtype):
        if name.endswith("attn_q.weight"):
            w = gguf_import.permute_rows(w, N_HEAD)
        elif name.endswith("attn_k.weight"):
            w = gguf_import.permute_rows(w, N_KV)
        data, raw_dtype = encode_tensor(rng, w, (override_types or {}).get(name, qtype))
        writer.add_tensor(name, data, raw_dtype=raw_dtype)

    weights = {}

    def normal(name, shape, scale, mean=0.0):
        weights[name] = (mean + scale * rng.standard_normal(shape)).astype(np.float32)
        return weights[name]

    add("token_embd.weight", normal("token_embd.weight", (len(tokens), D), 1.0), GGMLType.Q8_0)
    add("output_norm.weight", normal("output_norm.weight", (D,), 0.1, mean=1.0), GGMLType.F32)
    if not tied:
        add("output.weight", normal("output.weight", (len(tokens), D), 0.2), GGMLType.F16)
    shapes = {
        "attn_q": (N_HEAD * HEAD_DIM, D),
        "attn_k": (N_KV * HEAD_DIM, D),
        "attn_v": (N_KV * HEAD_DIM, D),
        "attn_output": (D, N_HEAD * HEAD_DIM),
        "ffn_gate": (FF, D),
        "ffn_up": (FF, D),
        "ffn_down": (D, FF),
    }
    for i in range(N_LAYERS):
        add(f"blk.{i}.attn_norm.weight", normal(f"blk.{i}.attn_norm.weight", (D,), 0.1, mean=1.0), GGMLType.F32)
        add(f"blk.{i}.ffn_norm.weight", normal(f"blk.{i}.ffn_norm.weight", (D,), 0.1, mean=1.0), GGMLType.F32)
        for module, shape in shapes.items():
            name = f"blk.{i}.{module}.weight"
            qtype = GGMLType.Q4_K if (module == "ffn_down" and i == 1) else BLOCK_TYPES[module]
            add(name, normal(name, shape, 0.2), qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    weights = write_tiny_llama(path)
    return path, weights


@pytest.fixture(scope="session")
def tiny_hf_dir(tiny_gguf, tmp_path_factory):
    return convert.convert_gguf(tiny_gguf[0], tmp_path_factory.mktemp("out") / "tiny", progress=False)


# ---------------------------------------------------------------------------------------------


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for n_head, head_dim in [(4, 16), (3, 64), (1, 8)]:
        w = rng.standard_normal((n_head * head_dim, 24)).astype(np.float32)
        permuted = gguf_import.permute_rows(w, n_head)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(gguf_import.unpermute_rows(permuted, n_head), w)
        bias = w[:, 0]
        np.testing.assert_array_equal(gguf_import.unpermute_rows(gguf_import.permute_rows(bias, n_head), n_head), bias)


def test_unpermute_restores_half_split_pairs():
    # one head of dim 4: llama.cpp rows [x0, y0, x1, y1] are Hugging Face rows [x0, x1, y0, y1]
    w = np.array([[0], [2], [1], [3]])
    np.testing.assert_array_equal(gguf_import.unpermute_rows(w, 1)[:, 0], [0, 1, 2, 3])


@pytest.mark.parametrize("qtype", gguf_import.SUPPORTED_TYPES, ids=lambda t: t.name)
def test_every_supported_type_dequantizes(tmp_path, qtype):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    data, raw_dtype = encode_tensor(rng, w, qtype)
    path = tmp_path / "one.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("t", data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tensor = gguf.GGUFReader(path).tensors[0]
    value = gguf_import.tensor_to_float32(tensor)
    assert value.dtype == np.float32 and value.shape == (4, 256)
    np.testing.assert_array_equal(value, gguf.quants.dequantize(tensor.data, qtype).reshape(4, 256))
    assert np.all(np.isfinite(value))
    if qtype not in K_QUANT_SCALES:  # these were quantized from w: the error is bounded
        assert np.abs(value - w).max() < 0.5


def test_tensors_match_gguf_dequantize(tiny_gguf, tiny_hf_dir):
    path, original = tiny_gguf
    converted = load_file(tiny_hf_dir / "model.safetensors")
    reader = gguf.GGUFReader(path)
    assert len(converted) == len(reader.tensors)
    for tensor in reader.tensors:
        name = gguf_import.hf_tensor_name(tensor.name)
        value = converted[name]
        assert value.dtype == np.float32
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(value.shape)
        if name.endswith("q_proj.weight"):
            expected = gguf_import.unpermute_rows(expected, N_HEAD)
        elif name.endswith("k_proj.weight"):
            expected = gguf_import.unpermute_rows(expected, N_KV)
        np.testing.assert_array_equal(value, expected, err_msg=name)
        if tensor.tensor_type not in K_QUANT_SCALES:  # close to the weights before llama.cpp's permutation
            assert np.abs(value - original[tensor.name]).max() < 0.1, name
    assert converted["model.embed_tokens.weight"].shape == (300, D)
    assert converted["model.layers.0.self_attn.k_proj.weight"].shape == (N_KV * HEAD_DIM, D)
    assert converted["model.layers.1.mlp.down_proj.weight"].shape == (D, FF)


def test_config_files(tiny_hf_dir):
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (N_LAYERS, D, FF)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
    assert config["vocab_size"] == 300 and config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    generation = json.loads((tiny_hf_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    tokenizer_config = json.loads((tiny_hf_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert tokenizer_config["bos_token"] == "<|im_start|>" and tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["add_bos_token"] is False
    assert not list(tiny_hf_dir.parent.glob(".*"))  # no temporary directory left


def test_tokenizer_matches_trained_bpe(tiny_hf_dir):
    ours = Tokenizer.from_file(str(tiny_hf_dir / "tokenizer.json"))
    reference = train_tiny_bpe()
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text).ids == reference.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


def test_logits_match_transformers_gguf_loader(tiny_gguf, tiny_hf_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = tiny_gguf[0]
    ours = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 123, 42, 299, 7, 250, 3, 64, 128]])
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids).logits
    assert expected.abs().max() > 1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    our_tokenizer = Tokenizer.from_file(str(tiny_hf_dir / "tokenizer.json"))
    for text in TEXTS:
        assert our_tokenizer.encode(text).ids == reference_tokenizer.encode(text), text


def test_tied_embeddings(tmp_path):
    write_tiny_llama(tmp_path / "tied.gguf", tied=True)
    out = convert.convert_gguf(tmp_path / "tied.gguf", tmp_path / "tied", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(out / "model.safetensors")


def test_unsupported_type_is_named(tmp_path):
    path = tmp_path / "q2k.gguf"
    write_tiny_llama(path, override_types={"blk.1.ffn_down.weight": GGMLType.Q2_K}, tied=True)
    with pytest.raises(convert.GGUFError, match=r"blk\.1\.ffn_down\.weight.*Q2_K"):
        convert.convert_gguf(path, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q2k.gguf"]


@pytest.mark.parametrize("keep", [0.6, 0.02])
def test_truncated_file_leaves_nothing(tiny_gguf, tmp_path, keep):
    data = tiny_gguf[0].read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(convert.GGUFError, match="truncated"):
        convert.convert_gguf(path, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated.gguf"]


def test_refuses_to_overwrite(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert.convert_gguf(tiny_gguf[0], out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="holds no model"):  # --force replaces only a model directory
        convert.convert_gguf(tiny_gguf[0], out, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert.convert_gguf(tiny_gguf[0], tmp_path / "model", progress=False)
    convert.convert_gguf(tiny_gguf[0], tmp_path / "model", overwrite=True, progress=False)
    assert (tmp_path / "model" / "config.json").exists() and convert.manifest_problems(tmp_path / "model") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


def test_rejects_other_architectures_and_pre_tokenizers():
    with pytest.raises(convert.GGUFError, match="'gpt2'"):
        gguf_import.hf_config({"general.architecture": "gpt2"}, [])
    with pytest.raises(convert.GGUFError, match="'qwen2'"):
        gguf_import.byte_level_pre_tokenizer("qwen2")
    with pytest.raises(convert.GGUFError, match="unknown GGUF tensor 'blk.0.attn_qkv.weight'"):
        gguf_import.hf_tensor_name("blk.0.attn_qkv.weight")


def test_smollm_pre_tokenizer_splits_digits():
    pieces = [p for p, _ in gguf_import.byte_level_pre_tokenizer("smollm").pre_tokenize_str("in 2024, x1")]
    assert pieces == ["in", "Ġ", "2", "0", "2", "4", ",", "Ġx", "1"]
    pieces = [p for p, _ in gguf_import.byte_level_pre_tokenizer("gpt-2").pre_tokenize_str("in 2024")]
    assert pieces == ["in", "Ġ2024"]


def test_cli_reports_errors_on_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "qsjax.convert", str(tmp_path / "missing.gguf"), str(tmp_path / "out")],
        capture_output=True,
        check=False,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: no such GGUF file") and result.stderr.count("\n") == 1
