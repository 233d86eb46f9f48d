"""Model configuration: one frozen dataclass for GPT-2 and the Llama-like families, read from a
Hugging Face config.json by each family's reader (`qsjax.dense.families`: `config_from_hf`, `load_config`).

Only fields that change the math are kept, normalised: a Llama-like block with options (biases, q/k
norms, Gemma's (1 + w) norms and post-norms, GeGLU, soft-capping, sliding windows per layer, RoPE
per layer kind), so that one block serves every family. A field that would change the math but that qsjax does
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
class YarnScaling:
    """YaRN RoPE scaling (`rope_type: yarn`): frequencies blended between interpolated and original
    by a ramp over [low, high] dimensions; cos and sin multiplied by `attention_factor`."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class LinearScaling:
    """Position interpolation (`rope_type: linear`): every frequency divided by `factor`."""

    factor: float


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str  # "gpt2" or "llama" (the Llama-like block, whatever the family)
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
    rope_scaling: RopeScaling | YarnScaling | LinearScaling | None = None
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    # Options of the Llama-like block; the defaults are Llama's (off: the same ops as without them).
    family: str = "llama"  # the Hugging Face model_type: picks the checkpoint key map
    qkv_bias: bool = False  # biases on q, k, v even without attn_bias (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # 1.0: RMSNorm scales by (1 + w), in float32 (Gemma)
    post_norms: bool = False  # norms after attention and after the MLP too (Gemma 2 and 3)
    embed_scale: float | None = None  # embeddings times this, rounded to their dtype (Gemma: sqrt(D))
    activation: str = "silu"  # the gated MLP's: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    attn_scale: float | None = None  # attention scores' scale (None: head_dim ** -0.5)
    attn_softcap: float | None = None  # scores -> c tanh(scores / c) (Gemma 2)
    final_softcap: float | None = None  # logits -> c tanh(logits / c) (Gemma 2)
    windows: tuple[int | None, ...] = ()  # per layer: a sliding window W (keys < W slots back), None: full; (): none
    local_rope_theta: float | None = None  # RoPE base of the sliding layers, unscaled (Gemma 3); None: as the others

    @property
    def layer_rules(self) -> bool:
        """Whether some layer attends under a rule of its own: soft-capped scores or a sliding window
        (`attention.Rule`; QuickSilver's passes do not apply them yet)."""
        return self.attn_softcap is not None or any(w is not None for w in self.windows)

    def window(self, layer: int) -> int | None:
        """The sliding window of block `layer` (0-based), None for full causal attention."""
        return self.windows[layer] if self.windows else None

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 = MHA, n_heads = MQA)."""
        return self.n_heads // self.n_kv_heads


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


def show(value) -> str:
    """A config value for a message: its JSON-like repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def positive(hf: dict, *keys: str) -> None:
    """Raise unless each of `keys` that is present is a positive integer."""
    for key in keys:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"config field {key}={show(value)} must be a positive integer")


def numbers(hf: dict, *keys: str) -> None:
    """Raise unless each of `keys` that is present is a finite number > 0."""
    for key in keys:
        value = hf.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        if value is not None and not ok:
            raise ConfigError(f"config field {key}={show(value)} must be a positive number")


def flags(hf: dict, *keys: str) -> None:
    """Raise unless each of `keys` that is present is true or false."""
    for key in keys:
        if hf.get(key) is not None and not isinstance(hf[key], bool):
            raise ConfigError(f"config field {key}={show(hf[key])} must be true or false")


def token_ids(hf: dict, *keys: str) -> None:
    """Raise unless each of `keys` that is present is a token id (an integer >= 0) or a list of them."""
    for key in keys:
        value = hf.get(key)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigError(f"config field {key}={show(value)} must be a token id or a list of them")


def check_types(hf: dict) -> None:
    """The fields both architectures read that are not sizes: numbers, flags, token ids."""
    numbers(hf, "layer_norm_epsilon", "rms_norm_eps", "rope_theta")
    flags(hf, "tie_word_embeddings", "attention_bias", "mlp_bias")
    token_ids(hf, "bos_token_id", "eos_token_id")


def eos_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def require(hf: dict, key: str, allowed) -> None:
    """Raise if `hf[key]` is set to a value outside `allowed` (a field qsjax cannot honour)."""
    if key in hf and hf[key] is not None and hf[key] not in allowed:
        raise UnsupportedConfig(f"config field {key}={hf[key]!r} is not supported (supported: {allowed})")
