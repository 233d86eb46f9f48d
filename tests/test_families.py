"""The families beyond Llama (Llama 3.x, Qwen2/2.5, Qwen3, Mistral, Gemma 2, Gemma 3 text, Phi-3) against
transformers on tiny random models: float32 logits of a left-padded batch, cached decoding against the
full forward, greedy generation, bfloat16, the scanned layers against the unrolled ones, and the
config fields that are refused by name."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch
from conftest import random_hf_model

from qsjax.dense.config import ModelConfig, UnsupportedConfig
from qsjax.dense.families import config_from_hf

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
            pad_token_id=None)
LLAMA3 = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=24, pad_token_id=0)
# name -> (transformers config class, its fields beyond BASE); windows shorter than the 24-token prompt
FAMILIES = {
    "llama3.1": ("LlamaConfig", dict(rope_theta=5e5, tie_word_embeddings=False, head_dim=16, num_hidden_layers=3,
                                     rope_scaling=dict(LLAMA3, factor=8.0))),
    "llama3.2": ("LlamaConfig", dict(rope_theta=5e5, tie_word_embeddings=True, num_key_value_heads=1, head_dim=16,
                                     rope_scaling=dict(LLAMA3, factor=32.0))),
    "qwen2": ("Qwen2Config", dict(rope_theta=1e6, tie_word_embeddings=True)),
    "qwen2-yarn-mqa": ("Qwen2Config", dict(num_key_value_heads=1, num_hidden_layers=3, tie_word_embeddings=False,
                                           rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                             original_max_position_embeddings=16))),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
    "qwen3-mqa-bias": ("Qwen3Config", dict(head_dim=8, num_key_value_heads=1, num_hidden_layers=3,
                                           attention_bias=True, tie_word_embeddings=False)),
    "mistral-window": ("MistralConfig", dict(sliding_window=5, num_hidden_layers=3, head_dim=16)),
    "mistral-full-mqa": ("MistralConfig", dict(sliding_window=None, num_key_value_heads=1)),
    "gemma2": ("Gemma2Config", dict(GEMMA, num_hidden_layers=3, sliding_window=5, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=3.0)),
    "gemma2-mqa-untied": ("Gemma2Config", dict(GEMMA, num_key_value_heads=1, sliding_window=7,
                                               tie_word_embeddings=False)),
    "gemma3": ("Gemma3TextConfig", dict(GEMMA, num_hidden_layers=5, sliding_window=5, rope_theta=1e6,
                                        rope_local_base_freq=100.0, rope_scaling=dict(rope_type="linear", factor=8.0),
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                     "sliding_attention", "full_attention"])),
    "gemma3-capped-mqa": ("Gemma3TextConfig", dict(GEMMA, num_key_value_heads=1, sliding_window=6,
                                                   final_logit_softcapping=3.0)),
    "phi3": ("Phi3Config", dict(tie_word_embeddings=False)),
    "phi3-window-mqa": ("Phi3Config", dict(num_key_value_heads=1, num_hidden_layers=3, sliding_window=7)),
}
T, START = 24, np.array([0, 5, 17])


def make(name: str):
    kind, fields = FAMILIES[name]
    return random_hf_model(kind, {**BASE, **fields})


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (directory, transformers model, qsjax float32 Model), built once."""
    from qsjax.checkpoints.hf_params import load_model

    out = {}
    for name in FAMILIES:
        path = tmp_path_factory.mktemp(name)
        hf = make(name)
        hf.save_pretrained(path, safe_serialization=True)
        out[name] = (path, hf, load_model(path))
    return out


def hf_logits(hf, tokens, start):
    mask = (np.arange(tokens.shape[1])[None, :] >= start[:, None]).astype(np.int64)
    positions = np.maximum(np.arange(tokens.shape[1])[None, :] - start[:, None], 0)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    return out.logits.float().numpy(), mask.astype(bool)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_padded_logits_match_transformers(name, families, rng):
    _, hf, model = families[name]
    tokens = rng.integers(2, 96, (3, T))
    ours = np.asarray(model.logits(tokens, START))
    ref, valid = hf_logits(hf, tokens, START)
    assert np.abs(ours - ref)[valid].max() <= 1e-4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cached_decoding_matches_the_full_forward(name, families, rng):
    """A prefilled prompt then decode steps give the logits of the whole sequence at once."""
    _, _, model = families[name]
    tokens, start, P = rng.integers(2, 96, (3, T)), np.array([0, 5, 11]), 12  # every row starts in the prompt
    full = np.asarray(model.logits(tokens, start))
    logits, cache = model.prefill(tokens[:, :P], start, T)
    got = [np.asarray(logits)]
    for t in range(P, T - 1):
        logits, cache = model.decode_step(cache, tokens[:, t])
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.stack(got, 1), full[:, P - 1:T - 1], atol=1e-5)


def test_every_family_has_odd_depth_and_shared_kv_heads(families):
    """Each family is checked with an odd number of layers (the scanned layers' remainder) and
    with key/value heads shared by several query heads (GQA or MQA)."""
    cfgs = [families[name][2].cfg for name in FAMILIES]
    kinds = {cfg.family for cfg in cfgs}
    assert kinds == {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"}
    assert kinds == {cfg.family for cfg in cfgs if cfg.n_layers % 2}
    assert kinds == {cfg.family for cfg in cfgs if cfg.n_kv_heads < cfg.n_heads}


# one per family; Mistral's window (5) is shorter than both prompts
@pytest.mark.parametrize("name", ["llama3.1", "qwen2-yarn-mqa", "qwen3-mqa-bias", "mistral-window", "gemma2", "gemma3",
                                  "phi3"])
def test_generator_greedy_matches_transformers(name, families, rng):
    from qsjax.runtime.generator import Generator

    _, hf, model = families[name]
    tokenizer = types.SimpleNamespace(eos_ids=(), pad_id=0, decode=lambda ids: "")
    gen = Generator(model, tokenizer)
    gen.eos_ids = ()  # no early stop: every new token compared
    prompts = [rng.integers(2, 96, 13).tolist(), rng.integers(2, 96, 9).tolist()]
    ours = gen(prompts, max_new_tokens=10).token_ids
    for prompt, new in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=10, min_new_tokens=10, eos_token_id=None, pad_token_id=0)
        assert new == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["qwen2-yarn-mqa", "gemma2", "gemma3", "phi3-window-mqa"])
def test_bfloat16_completes_close_to_float32(name, families, rng):
    from qsjax.checkpoints.hf_params import load_model

    path, _, model = families[name]
    tokens = rng.integers(2, 96, (3, T))
    ref = np.asarray(model.logits(tokens, START))
    out = np.asarray(load_model(path, "bfloat16").logits(tokens, START), np.float32)
    valid = np.arange(T)[None, :] >= START[:, None]
    assert np.isfinite(out).all()
    assert np.abs(out - ref)[valid].max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "mistral-window"])
def test_scanned_layers_equal_unrolled(name, families, rng, monkeypatch):
    """Layers of alternating kinds scanned a period at a time (the remainder unrolled) = unrolled."""
    from qsjax.dense import model as dense
    from qsjax.dense.model import Model, layer_period

    _, _, model = families[name]
    tokens = rng.integers(2, 96, (3, T))
    unrolled = np.asarray(model.logits(tokens, START))
    monkeypatch.setattr(dense, "UNROLL_TOKENS", 0)
    scanned = np.asarray(Model(model.cfg, model.graphdef, model.state).logits(tokens, START))
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5)
    assert layer_period(list(model.module().blocks)) == {"gemma2": 2, "gemma3": 3, "mistral-window": 1}[name]


def test_configs_read_the_family_options(families):
    cfg = lambda name: families[name][2].cfg
    assert cfg("qwen2").qkv_bias and not cfg("qwen2").attn_bias and cfg("qwen2").rope_theta == 1e6
    assert cfg("qwen3").qk_norm and cfg("qwen3").head_dim == 16
    assert cfg("mistral-window").windows == (5, 5, 5) and cfg("mistral-full-mqa").windows == ()
    g2 = cfg("gemma2")
    assert (g2.windows, g2.attn_softcap, g2.final_softcap, g2.norm_offset, g2.post_norms) == ((5, None, 5), 5.0, 3.0, 1.0, True)
    assert g2.attn_scale == 24 ** -0.5 and g2.activation == "gelu_tanh" and g2.embed_scale == 32 ** 0.5
    g3 = cfg("gemma3")
    assert g3.windows == (5, None, 5, 5, None) and g3.local_rope_theta == 100.0 and g3.rope_theta == 1e6
    assert g3.attn_softcap is None and g3.qk_norm
    assert cfg("llama3.2").rope_scaling.factor == 32.0 and cfg("llama3.2").tie_embeddings


def test_yarn_frequencies_match_transformers():
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qsjax.dense.rope import inverse_frequencies

    hf = Qwen2Config(hidden_size=1024, num_attention_heads=8, num_key_value_heads=8, rope_theta=1e6, max_position_embeddings=131072,
                     rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768))
    ref, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
    cfg = config_from_hf(hf.to_dict())
    np.testing.assert_allclose(inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), ref.numpy(), rtol=1e-6)
    assert cfg.rope_scaling.attention_factor == pytest.approx(factor)


QWEN2 = dict(BASE, model_type="qwen2", rope_theta=1e6)


@pytest.mark.parametrize("config, field", [
    ({**QWEN2, "use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
    ({**QWEN2, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    ({**QWEN2, "model_type": "phi3", "rope_scaling": {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}},
     "rope_type='longrope'"),
    ({**QWEN2, "model_type": "phi3", "rope_scaling": {"type": "su", "long_factor": [1.0]}}, "rope_type='su'"),
    ({**QWEN2, "model_type": "phi3", "partial_rotary_factor": 0.75}, "partial_rotary_factor"),
    ({**QWEN2, "model_type": "gemma2", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({**QWEN2, "model_type": "gemma2", "hidden_activation": "gelu"}, "hidden_activation"),
    ({**QWEN2, "model_type": "gemma3_text", "layer_types": ["chunked_attention"] * 2}, "layer_types"),
    ({**QWEN2, "model_type": "gemma3_text", "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({**QWEN2, "model_type": "mistral", "hidden_act": "relu"}, "hidden_act"),
])
def test_unsupported_fields_are_refused_by_name(config, field):
    with pytest.raises(UnsupportedConfig, match=field):
        config_from_hf(config)


def test_a_checkpoint_key_of_another_family_is_refused(families):
    """A Qwen3 q_norm key in a Qwen2 checkpoint (no q/k norms) names the parameter."""
    import jax
    from flax import nnx

    from qsjax.checkpoints.hf_params import WeightError, map_checkpoint, read_safetensors

    path, _, model = families["qwen2"]
    tensors = read_safetensors(path)
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    expected = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(model.state))
    with pytest.raises(WeightError, match="no parameter blocks.0.q_norm"):
        map_checkpoint(model.cfg, tensors, expected)


def test_default_llama_block_has_no_options():
    """With Llama's config, no family option is on: the same ops as before the options existed."""
    from conftest import LLAMA_BASE

    cfg = config_from_hf(dict(LLAMA_BASE, model_type="llama", num_attention_heads=4))
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    for field in ("qkv_bias", "qk_norm", "norm_offset", "post_norms", "embed_scale", "attn_scale", "attn_softcap",
                  "final_softcap", "windows", "local_rope_theta"):
        assert getattr(cfg, field) == defaults[field]
    assert cfg.activation == "silu" and cfg.family == "llama"


@pytest.mark.parametrize("name", ["qwen2", "qwen3-mqa-bias", "gemma3", "phi3"])
def test_every_parameter_has_a_sharding_rule(name, families):
    """`shard_model`'s rules name every new parameter (q/k norms, post-norms, q/k/v biases)."""
    import jax
    from jax.sharding import PartitionSpec as P

    from qsjax.runtime.sharding import logical_axes, partition_spec

    model = families[name][2]
    specs = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.state):
        names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        specs[names] = partition_spec(logical_axes(names, leaf.ndim), leaf.shape, model.cfg, {"data": 1, "model": 2})
    split = "model" if model.cfg.n_kv_heads % 2 == 0 else None  # whole key/value groups, or replicated
    assert specs[("blocks", 0, "qkv_proj", "w")] == P(None, split)
    if model.cfg.qk_norm:
        assert specs[("blocks", 0, "q_norm", "scale")] == P(None)
    if model.cfg.qkv_bias or model.cfg.attn_bias:
        assert specs[("blocks", 0, "qkv_proj", "b")] == P(split)
