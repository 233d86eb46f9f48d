"""Each Hugging Face model_type's config.json read into the normalised `ModelConfig`.

GPT-2 has its own block; every other family is the Llama-like block with options:

    llama        RoPE (default, linear, llama3, yarn), optional biases, tied or untied head
    mistral      + a sliding window on every layer (`sliding_window`, may be null)
    qwen2        + biases on q, k, v only; qwen3: + RMSNorm on each head of q and k
    phi3         fused qkv_proj and gate_up_proj in the checkpoint; optional sliding window
    gemma2       (1 + w) norms, post-norms, scaled embeddings, GeGLU, soft-capping, query_pre_attn_scalar,
                 sliding layers by `layer_types` (default: even layers)
    gemma3_text  gemma2's pieces + q/k norms, sliding layers with their own unscaled RoPE base

A field that changes the math and is not implemented raises `UnsupportedConfig` naming it.
"""

from __future__ import annotations

import math
from pathlib import Path

from qsjax.dense.config import (ConfigError, LinearScaling, ModelConfig, RopeScaling, UnsupportedConfig, YarnScaling,
                                check_types, eos_ids, flags, numbers, positive, read_json_object, require, show)

SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
         "intermediate_size", "max_position_embeddings", "sliding_window")


def _gpt2_config(hf: dict) -> ModelConfig:
    require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"))
    require(hf, "scale_attn_weights", (True,))
    require(hf, "scale_attn_by_inverse_layer_idx", (False,))
    require(hf, "add_cross_attention", (False,))
    require(hf, "tie_word_embeddings", (True,))
    positive(hf, "vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions")
    check_types(hf)
    d = hf["n_embd"]
    return ModelConfig(
        arch="gpt2",
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        n_kv_heads=hf["n_head"],
        head_dim=d // hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d,
        max_positions=hf["n_positions"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=True,
        attn_bias=True,
        mlp_bias=True,
        bos_id=hf.get("bos_token_id"),
        eos_ids=eos_ids(hf),
        family="gpt2",
    )


def _yarn(hf: dict, params: dict) -> YarnScaling:
    """transformers' `_compute_yarn_parameters` inputs, their defaults filled in."""
    original = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") \
        or hf.get("max_position_embeddings", 2048)
    factor = params.get("factor") or hf.get("max_position_embeddings", 2048) / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return YarnScaling(float(factor), int(original), float(params.get("beta_fast") or 32),
                       float(params.get("beta_slow") or 1), float(attention_factor), bool(params.get("truncate", True)))


def _rope(hf: dict, params) -> tuple[float, RopeScaling | YarnScaling | LinearScaling | None]:
    """(theta, scaling) of one RoPE parameter object (transformers >= 5's `rope_parameters`, or an older
    file's `rope_scaling` with `rope_theta` beside it)."""
    if not isinstance(params, dict):
        raise ConfigError(f"config field rope_scaling={show(params)} must be an object")
    params = dict(params)
    numbers(params, "rope_theta", "factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
            "attention_factor", "partial_rotary_factor")
    positive(params, "original_max_position_embeddings")
    for where in (params, hf):
        if where.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedConfig(f"config field partial_rotary_factor={where['partial_rotary_factor']!r} is not "
                                    "supported (partial rotary embeddings; supported: 1.0)")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, LinearScaling(float(params["factor"]))
    if rope_type == "yarn":
        return theta, _yarn(hf, params)
    if rope_type == "llama3":
        return theta, RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedConfig(f"config field rope_type={rope_type!r} is not supported "
                            "(supported: 'default', 'linear', 'llama3', 'yarn')")


def _rope_params(hf: dict):
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def _layer_types(hf: dict, default) -> list[str]:
    """Each layer's kind ("sliding_attention" or "full_attention"): `layer_types`, else `default(i)`."""
    L = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [default(i) for i in range(L)]
    if not isinstance(types, list) or len(types) != L:
        raise ConfigError(f"config field layer_types={show(types)} must list one kind per layer ({L})")
    for t in types:
        if t not in ("sliding_attention", "full_attention"):
            raise UnsupportedConfig(f"config field layer_types entry {t!r} is not supported "
                                    "(supported: 'sliding_attention', 'full_attention')")
    return types


def _windows(hf: dict, types: list[str]) -> tuple[int | None, ...]:
    """Per layer, the sliding window of a "sliding_attention" layer, None for a full one; () if none."""
    window = hf.get("sliding_window")
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return windows if any(w is not None for w in windows) else ()


def _llama_like(hf: dict, family: str, *, act_key="hidden_act", acts=("silu",), types=None, **options) -> ModelConfig:
    """The fields every Llama-like family reads; `options` (ModelConfig fields) are the family's own.
    types: each layer's kind (None: every layer full, or sliding when `sliding_window` is set)."""
    require(hf, act_key, acts)
    require(hf, "pretraining_tp", (1,))
    positive(hf, *SIZES)
    check_types(hf)
    d, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or n_heads
    if n_heads % n_kv:
        raise UnsupportedConfig(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    theta, scaling = _rope(hf, options.pop("rope", None) or _rope_params(hf))
    if types is None:
        types = ["sliding_attention"] * hf["num_hidden_layers"]
    return ModelConfig(
        arch="llama",
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=hf.get("head_dim") or d // n_heads,
        d_ff=hf["intermediate_size"],
        max_positions=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attn_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        bos_id=hf.get("bos_token_id"),
        eos_ids=eos_ids(hf),
        family=family,
        windows=_windows(hf, types),
        **options,
    )


def _llama_config(hf: dict) -> ModelConfig:
    return _llama_like({**hf, "sliding_window": None}, "llama")  # Llama has no sliding window


def _mistral_config(hf: dict) -> ModelConfig:
    return _llama_like(hf, "mistral")


def _phi3_config(hf: dict) -> ModelConfig:
    return _llama_like(hf, "phi3")


def _no_qwen_sliding(hf: dict) -> dict:
    """Qwen's `use_sliding_window` (on layers from `max_window_layers` up) is refused; off, the
    `sliding_window` beside it means nothing."""
    flags(hf, "use_sliding_window")
    require(hf, "use_sliding_window", (False,))
    return {**hf, "sliding_window": None, "layer_types": None}


def _qwen2_config(hf: dict) -> ModelConfig:
    return _llama_like({**_no_qwen_sliding(hf), "attention_bias": False}, "qwen2", qkv_bias=True)


def _qwen3_config(hf: dict) -> ModelConfig:
    return _llama_like(_no_qwen_sliding(hf), "qwen3", qk_norm=True)


def _gemma_options(hf: dict) -> dict:
    """What Gemma 2 and 3 share: (1 + w) norms, post-norms, sqrt(D) embeddings, GeGLU, the score scale,
    soft-capping (Gemma 3: none unless set)."""
    numbers(hf, "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")
    require(hf, "use_bidirectional_attention", (False,))
    scalar = hf.get("query_pre_attn_scalar") or 256
    return dict(act_key="hidden_activation", acts=("gelu_pytorch_tanh",), norm_offset=1.0, post_norms=True,
                embed_scale=float(hf["hidden_size"]) ** 0.5, activation="gelu_tanh", attn_scale=float(scalar) ** -0.5,
                attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"))


def _gemma2_config(hf: dict) -> ModelConfig:
    hf = {**hf, "tie_word_embeddings": hf.get("tie_word_embeddings", True)}
    types = _layer_types(hf, lambda i: "sliding_attention" if (i + 1) % 2 else "full_attention")
    return _llama_like(hf, "gemma2", types=types, **_gemma_options(hf))


def _gemma3_config(hf: dict) -> ModelConfig:
    hf = {"rope_theta": 1e6, **hf, "tie_word_embeddings": hf.get("tie_word_embeddings", True)}
    if hf.get("attn_logit_softcapping") is not None:  # transformers' Gemma 3 stores it but never applies it
        raise UnsupportedConfig(f"config field attn_logit_softcapping={hf['attn_logit_softcapping']!r} is not "
                                "supported for gemma3_text (supported: null)")
    positive(hf, "sliding_window_pattern", "_sliding_window_pattern")
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
    types = _layer_types(hf, lambda i: "sliding_attention" if (i + 1) % pattern else "full_attention")
    params = _rope_params(hf)
    if isinstance(params, dict) and "full_attention" in params:  # transformers >= 5: one object per layer kind
        full, local = params["full_attention"], params.get("sliding_attention") or {}
    else:
        full = params
        local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    local_theta, local_scaling = _rope({**hf, "rope_theta": 10000.0}, local)
    if local_scaling is not None:
        raise UnsupportedConfig("config field rope_parameters.sliding_attention: scaled RoPE on the sliding layers "
                                "is not supported (supported: rope_type 'default')")
    return _llama_like(hf, "gemma3_text", types=types, rope=full or {"rope_theta": hf.get("rope_theta", 1e6)},
                       qk_norm=True, local_rope_theta=local_theta, **_gemma_options(hf))


READERS = {"gpt2": _gpt2_config, "llama": _llama_config, "mistral": _mistral_config, "qwen2": _qwen2_config,
           "qwen3": _qwen3_config, "phi3": _phi3_config, "gemma2": _gemma2_config, "gemma3_text": _gemma3_config}


def config_from_hf(hf: dict) -> ModelConfig:
    """A Hugging Face config.json's fields as a ModelConfig, by its family's reader."""
    model_type = hf.get("model_type")
    if model_type not in READERS:
        supported = ", ".join(repr(k) for k in READERS)
        raise UnsupportedConfig(f"model_type {model_type!r} is not supported (supported: {supported})")
    return READERS[model_type](hf)


def load_config(model_dir: str | Path) -> ModelConfig:
    """The config.json of a model directory; a ConfigError names the file and the field at fault."""
    path = Path(model_dir) / "config.json"
    hf = read_json_object(path, ConfigError)
    try:
        return config_from_hf(hf)
    except KeyError as e:
        raise ConfigError(f"{path} has no {e.args[0]!r} field") from None
    except ConfigError as e:
        raise type(e)(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:  # a field of the wrong type, e.g. a string where a number belongs
        raise ConfigError(f"{path}: a field has the wrong type ({e})") from None
