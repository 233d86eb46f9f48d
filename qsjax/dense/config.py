"""Model configuration: one frozen dataclass for GPT-2 and Llama, read from a Hugging Face config.json.

Only fields that change the math are kept. A field that would change the math but that qsjax does
not implement raises `UnsupportedConfig` naming it, rather than being silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path


class ConfigError(ValueError):
    """A config.json cannot be used: not JSON, not an object, a field missing or out of range."""


class UnsupportedConfig(ConfigError):
    """A config.json asks for something qsjax does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str  # "gpt2" or "llama"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_positions: int
    norm_eps: float
    tie_embeddings: bool
    attn_bias: bool
    mlp_bias: bool
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 = MHA, n_heads = MQA)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type == "gpt2":
            return _gpt2_config(hf)
        if model_type == "llama":
            return _llama_config(hf)
        raise UnsupportedConfig(f"model_type {model_type!r} is not supported (supported: 'gpt2', 'llama')")


def read_json_object(path: Path, error=ValueError) -> dict:
    """A file holding one JSON object; `error` naming the file (and the line) when it does not."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text") from None
    except RecursionError:
        raise error(f"{path} is nested too deeply to be a config") from None
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, not a {type(value).__name__}")
    return value


def load_config(model_dir: str | Path) -> ModelConfig:
    """The config.json of a model directory; a ConfigError names the file and the field at fault."""
    path = Path(model_dir) / "config.json"
    hf = read_json_object(path, ConfigError)
    try:
        return ModelConfig.from_hf(hf)
    except KeyError as e:
        raise ConfigError(f"{path} has no {e.args[0]!r} field") from None
    except ConfigError as e:
        raise type(e)(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:  # a field of the wrong type, e.g. a string where a number belongs
        raise ConfigError(f"{path}: a field has the wrong type ({e})") from None


def _show(value) -> str:
    """A config value for a message: its JSON-like repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _positive(hf: dict, *keys: str) -> None:
    """Raise unless each of `keys` that is present is a positive integer."""
    for key in keys:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"config field {key}={_show(value)} must be a positive integer")


def _numbers(hf: dict, *keys: str) -> None:
    """Raise unless each of `keys` that is present is a finite number > 0."""
    for key in keys:
        value = hf.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        if value is not None and not ok:
            raise ConfigError(f"config field {key}={_show(value)} must be a positive number")


def _flags(hf: dict, *keys: str) -> None:
    """Raise unless each of `keys` that is present is true or false."""
    for key in keys:
        if hf.get(key) is not None and not isinstance(hf[key], bool):
            raise ConfigError(f"config field {key}={_show(hf[key])} must be true or false")


def _token_ids(hf: dict, *keys: str) -> None:
    """Raise unless each of `keys` that is present is a token id (an integer >= 0) or a list of them."""
    for key in keys:
        value = hf.get(key)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigError(f"config field {key}={_show(value)} must be a token id or a list of them")


def _check_types(hf: dict) -> None:
    """The fields both architectures read that are not sizes: numbers, flags, token ids."""
    _numbers(hf, "layer_norm_epsilon", "rms_norm_eps", "rope_theta")
    _flags(hf, "tie_word_embeddings", "attention_bias", "mlp_bias")
    _token_ids(hf, "bos_token_id", "eos_token_id")


def _eos_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _require(hf: dict, key: str, allowed) -> None:
    """Raise if `hf[key]` is set to a value outside `allowed` (a field qsjax cannot honour)."""
    if key in hf and hf[key] is not None and hf[key] not in allowed:
        raise UnsupportedConfig(f"config field {key}={hf[key]!r} is not supported (supported: {allowed})")


def _gpt2_config(hf: dict) -> ModelConfig:
    _require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"))
    _require(hf, "scale_attn_weights", (True,))
    _require(hf, "scale_attn_by_inverse_layer_idx", (False,))
    _require(hf, "add_cross_attention", (False,))
    _require(hf, "tie_word_embeddings", (True,))
    _positive(hf, "vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions")
    _check_types(hf)
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
        eos_ids=_eos_ids(hf),
    )


def _llama_rope(hf: dict) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config field rope_scaling={_show(params)} must be an object")
    params = dict(params)
    _numbers(params, "rope_theta", "factor", "low_freq_factor", "high_freq_factor")
    _positive(params, "original_max_position_embeddings")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedConfig(f"config field rope_type={rope_type!r} is not supported (supported: 'default', 'llama3')")


def _llama_config(hf: dict) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",))
    _require(hf, "pretraining_tp", (1,))
    _positive(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "max_position_embeddings")
    _check_types(hf)
    d, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or n_heads
    if n_heads % n_kv:
        raise UnsupportedConfig(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    theta, scaling = _llama_rope(hf)
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
        eos_ids=_eos_ids(hf),
    )
