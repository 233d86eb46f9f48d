"""ModelConfig from Hugging Face config.json: supported fields, and a clear error for the rest."""

import pytest

from qsjax.dense.config import UnsupportedConfig
from qsjax.dense.families import config_from_hf
from qsjax.dense.rope import inverse_frequencies

GPT2 = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
            layer_norm_epsilon=1e-5, eos_token_id=50256)
LLAMA = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
             tie_word_embeddings=True, max_position_embeddings=8192, eos_token_id=[2, 3])


def test_gpt2_small():
    cfg = config_from_hf(GPT2)
    assert (cfg.arch, cfg.d_model, cfg.n_layers, cfg.head_dim, cfg.d_ff, cfg.tie_embeddings) == ("gpt2", 768, 12, 64, 3072, True)
    assert cfg.eos_ids == (50256,)


def test_llama_gqa_and_rope_parameters():
    cfg = config_from_hf(LLAMA)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.group_size, cfg.head_dim, cfg.rope_theta) == (9, 3, 3, 64, 100000.0)
    assert cfg.eos_ids == (2, 3)
    new_style = {**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    del new_style["rope_theta"]
    assert config_from_hf(new_style).rope_theta == 5e5


@pytest.mark.parametrize("field, value", [
    ("hidden_act", "gelu"),
    ("rope_scaling", {"rope_type": "dynamic", "factor": 4.0}),
    ("pretraining_tp", 2),
])
def test_unsupported_llama_fields(field, value):
    with pytest.raises(UnsupportedConfig, match=field if field != "rope_scaling" else "rope_type='dynamic'"):
        config_from_hf({**LLAMA, field: value})


@pytest.mark.parametrize("field, value", [
    ("activation_function", "relu"),
    ("scale_attn_by_inverse_layer_idx", True),
    ("add_cross_attention", True),
])
def test_unsupported_gpt2_fields(field, value):
    with pytest.raises(UnsupportedConfig, match=field):
        config_from_hf({**GPT2, field: value})


def test_unknown_model_type():
    with pytest.raises(UnsupportedConfig, match="model_type 'falcon'"):
        config_from_hf({**LLAMA, "model_type": "falcon"})


def test_llama3_rope_matches_transformers():
    import numpy as np
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    hf_cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, torch.device("cpu"))
    cfg = config_from_hf(hf_cfg.to_dict())
    np.testing.assert_allclose(inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), ref.numpy(), rtol=1e-6)
