"""GGUF import beyond Llama 2: a tiny random transformers model of each architecture (Llama 3, Qwen2,
Qwen3, Phi-3, Gemma 2, Gemma 3) written as llama.cpp's converter writes it (`gguf`'s own tensor name
map, Q/K rows permuted for Llama only, Gemma's norms as 1 + w, Llama 3's `rope_freqs`, float32
tensors), converted, loaded with qsjax, and compared with the original model; and the metadata
qsjax cannot map, refused by name."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import random_hf_model
from test_convert import CHAT_TEMPLATE, SPECIALS, train_tiny_bpe
from test_families import BASE, GEMMA, LLAMA3

from qsjax import convert
from qsjax.checkpoints import gguf_file

GEMMA_GGUF = dict(GEMMA, query_pre_attn_scalar=16)  # llama.cpp's Gemma scale: 1/sqrt(head_dim) below 27B
# name -> (GGUF architecture, transformers config class, its fields beyond BASE)
CASES = {
    "llama3": ("llama", "LlamaConfig", dict(rope_theta=5e5, max_position_embeddings=32768, head_dim=16, tie_word_embeddings=False,
                                            rope_scaling=dict(LLAMA3, factor=8.0, original_max_position_embeddings=8192))),
    # a ramp of three frequencies: low/high_freq_factor fitted, not Llama 3's 1 and 4
    "llama3-fit": ("llama", "LlamaConfig", dict(rope_theta=5e5, max_position_embeddings=32768, head_dim=32, tie_word_embeddings=True,
                                                rope_scaling=dict(LLAMA3, factor=16.0, high_freq_factor=16.0,
                                                                  original_max_position_embeddings=8192))),
    "qwen2": ("qwen2", "Qwen2Config", dict(rope_theta=1e6, tie_word_embeddings=True)),
    "qwen2-yarn": ("qwen2", "Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=False, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16))),
    "qwen3": ("qwen3", "Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
    "phi3": ("phi3", "Phi3Config", dict(tie_word_embeddings=False)),
    "phi3-window": ("phi3", "Phi3Config", dict(num_key_value_heads=1, sliding_window=7, tie_word_embeddings=False)),
    "gemma2": ("gemma2", "Gemma2Config", dict(GEMMA_GGUF, num_hidden_layers=3, sliding_window=5,
                                              attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("gemma3", "Gemma3TextConfig", dict(GEMMA_GGUF, num_hidden_layers=6, sliding_window=5, rope_theta=1e6,
                                                  rope_scaling=dict(rope_type="linear", factor=8.0))),
}
T = 20


def make(name: str, vocab_size: int):
    _, kind, fields = CASES[name]
    return random_hf_model(kind, {**BASE, **fields, "vocab_size": vocab_size})


def rope(config) -> dict:
    """transformers' RoPE parameters (of the full-attention layers): rope_theta, rope_type, factor, ..."""
    params = config.rope_parameters
    return params.get("full_attention", params)


def llama3_rope_freqs(config) -> np.ndarray:
    """The per-frequency factors a Llama 3 GGUF stores as `rope_freqs`: with wavelength 2 pi / inv_freq
    and the original context N, 1 where wavelength < N / high_freq_factor, `factor` where wavelength >
    N / low_freq_factor, and 1 / ((1 - s) / factor + s) between, s = (N / wavelength - low) / (high - low)."""
    scaling, dim = rope(config), config.head_dim
    inv_freq = 1.0 / scaling["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    wavelength = np.float32(2 * math.pi) / inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    n = scaling["original_max_position_embeddings"]
    s = (n / wavelength - low) / (high - low)
    between = 1 / ((1 - s) / factor + s)
    return np.where(wavelength < n / high, 1.0, np.where(wavelength > n / low, factor, between)).astype(np.float32)


def add_metadata(w: gguf.GGUFWriter, arch: str, c) -> None:
    """The `<arch>.*` keys llama.cpp's converter writes for this architecture."""
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    scaling = rope(c)
    if arch != "gemma2":
        w.add_rope_freq_base(scaling["rope_theta"])
    if arch.startswith("gemma"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(c.sliding_window)
    else:
        w.add_rope_dimension_count(head_dim)
        if head_dim != c.hidden_size // c.num_attention_heads:
            w.add_key_length(head_dim)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings or c.max_position_embeddings)
        w.add_sliding_window(c.sliding_window or 0)
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    if scaling.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])


def add_tokenizer(w: gguf.GGUFWriter) -> int:
    """test_convert's tiny byte-level BPE; returns its vocabulary size."""
    bpe = train_tiny_bpe()
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if token in SPECIALS else 1 for token in tokens])
    w.add_token_merges([" ".join(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_chat_template(CHAT_TEMPLATE)
    return len(tokens)


def write_gguf(path, name: str):
    """A float32 GGUF of case `name` laid out as llama.cpp's converter does; returns the transformers model."""
    arch = CASES[name][0]
    w = gguf.GGUFWriter(str(path), arch)
    model = make(name, add_tokenizer(w))
    c = model.config
    add_metadata(w, arch, c)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        value = value.float().numpy()
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in key else c.num_key_value_heads
            value = gguf_file.permute_rows(value, heads)
        if arch.startswith("gemma") and key.endswith("norm.weight"):
            value = value + 1
        w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(value))
    if rope(c)["rope_type"] == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(c))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (GGUF path, converted directory, transformers model)."""
    out = {}
    for name in CASES:
        tmp = tmp_path_factory.mktemp(name)
        model = write_gguf(tmp / f"{name}.gguf", name)
        out[name] = (tmp / f"{name}.gguf", convert.convert_gguf(tmp / f"{name}.gguf", tmp / "hf", progress=False), model)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_converted_logits_match_the_original(name, converted, tmp_path, rng):
    """qsjax on the converted directory = qsjax on the original's own save (1e-5) = transformers (1e-4)."""
    from qsjax.checkpoints.hf_params import load_model

    _, out, hf = converted[name]
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tokens, start = rng.integers(2, 300, (2, T)), np.zeros(2, np.int64)
    ours = np.asarray(load_model(out).logits(tokens, start))
    np.testing.assert_allclose(ours, np.asarray(load_model(tmp_path).logits(tokens, start)), atol=1e-5, rtol=0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens)).logits.float().numpy()
    assert np.abs(ref).max() > 0.3 and np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("name", ["llama3-fit", "qwen2-yarn", "phi3-window", "gemma2", "gemma3"])
def test_config_round_trips_the_fields(name, converted):
    """The fields llama.cpp keeps come back as transformers wrote them; transformers reads the result."""
    import transformers

    _, out, hf = converted[name]
    ours = transformers.AutoConfig.from_pretrained(out)
    fields = {"llama3-fit": ["rope_parameters"], "qwen2-yarn": ["rope_parameters"],
              "phi3-window": ["sliding_window", "original_max_position_embeddings"],
              "gemma2": ["sliding_window", "layer_types", "attn_logit_softcapping", "final_logit_softcapping",
                         "query_pre_attn_scalar", "head_dim"],
              "gemma3": ["sliding_window", "layer_types", "rope_parameters", "query_pre_attn_scalar"]}[name]
    for field in fields + ["model_type", "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps"]:
        assert getattr(ours, field) == getattr(hf.config, field), field


def test_norms_are_unshifted_and_qk_rows_unpermuted_only_where_llama_cpp_changed_them(converted):
    from safetensors.numpy import load_file

    for name, key in [("gemma3", "model.layers.0.self_attn.q_norm.weight"), ("gemma2", "model.norm.weight"),
                      ("qwen3", "model.layers.1.self_attn.k_proj.weight"), ("llama3", "model.layers.1.self_attn.q_proj.weight"),
                      ("phi3", "model.layers.0.self_attn.qkv_proj.weight"), ("phi3", "model.layers.1.mlp.gate_up_proj.weight")]:
        _, out, hf = converted[name]
        got, want = load_file(out / "model.safetensors")[key], hf.state_dict()[key].numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=2 ** -23, err_msg=key)  # Gemma's 1 + w - 1: one float32 ulp of 1


def meta_of(converted, name: str) -> tuple[dict, list[str]]:
    reader = gguf.GGUFReader(converted[name][0])
    return gguf_file.read_metadata(reader), [t.name for t in reader.tensors]


@pytest.mark.parametrize("name, key, value", [
    ("qwen2", "qwen2.attention.sliding_window", 8),
    ("qwen2-yarn", "qwen2.rope.scaling.yarn_log_multiplier", 0.1),
    ("gemma3", "gemma3.attn_logit_softcapping", 50.0),
    ("phi3", "phi3.rope.scaling.type", "longrope"),
    ("llama3", "llama.logit_scale", 2.0),
])
def test_metadata_qsjax_cannot_map_is_refused_by_name(converted, name, key, value):
    meta, names = meta_of(converted, name)
    with pytest.raises(gguf_file.GGUFError, match=key.split(".", 1)[1]):
        gguf_file.hf_config({**meta, key: value}, names)


def test_rope_freqs_that_no_llama3_scaling_gives_are_refused(converted):
    meta, names = meta_of(converted, "llama3-fit")
    freqs = llama3_rope_freqs(converted["llama3-fit"][2].config)
    assert gguf_file.hf_config(meta, names, freqs)["rope_scaling"]["high_freq_factor"] == 16.0
    freqs[-1] = 3.0  # the lowest frequency no longer divided by `factor`
    with pytest.raises(gguf_file.GGUFError, match="rope_freqs.weight"):
        gguf_file.hf_config(meta, names, freqs)
    meta, names = meta_of(converted, "qwen2")
    with pytest.raises(gguf_file.GGUFError, match="rope_freqs.weight.*'qwen2'"):
        gguf_file.hf_config(meta, names, freqs)


def test_cli_names_an_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    result = subprocess.run([sys.executable, "-m", "qsjax.convert", str(tmp_path / "falcon.gguf"), str(tmp_path / "out")],
                            capture_output=True, check=False, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: GGUF architecture 'falcon' is not supported")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["falcon.gguf"]
