"""What differs between the GGUF architectures qsjax converts: tensor names, layouts, and the
`<arch>.*` metadata keys that rebuild a Hugging Face config.json (see qsjax.checkpoints.gguf_file).

    GGUF arch   Hugging Face model_type   layout differences in the GGUF file
    llama       llama (Mistral too)       Q/K rows permuted; Llama 3 RoPE as a `rope_freqs` tensor
    qwen2       qwen2                     none (q, k, v biases)
    qwen3       qwen3                     none (q/k norms)
    phi3        phi3                      fused `attn_qkv`; `ffn_up` holds gate then up
    gemma2      gemma2                    every `*norm.weight` stored as (1 + w)
    gemma3      gemma3_text               as gemma2, plus q/k norms

Every `<arch>.*` metadata key must be read by the family's rules (`Fields` records what was read):
one that is not, e.g. a YaRN attention factor, is refused by name rather than ignored.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


class GGUFError(ValueError):
    """The GGUF file cannot be converted: unreadable, truncated, or describing something unsupported."""


_ATTENTION = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj"}
_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_LLAMA_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GEMMA_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}


@dataclasses.dataclass(frozen=True)
class Arch:
    """One GGUF architecture: `blk.N.<module>` -> `model.layers.N.<module>`, and its layout."""

    model_type: str  # Hugging Face's
    class_name: str  # config.json "architectures"
    modules: dict[str, str]
    permute_qk: bool = False  # llama.cpp permuted the q/k rows (its converter does so for Llama only)
    norm_shift: float = 0.0  # llama.cpp stored every norm weight plus this (Gemma: 1)
    qkv_bias: bool = False  # q, k and v always have biases (Qwen2)


ARCHES = {
    "llama": Arch("llama", "LlamaForCausalLM", {**_LLAMA_NORMS, **_ATTENTION, **_MLP}, permute_qk=True),
    "qwen2": Arch("qwen2", "Qwen2ForCausalLM", {**_LLAMA_NORMS, **_ATTENTION, **_MLP}, qkv_bias=True),
    "qwen3": Arch("qwen3", "Qwen3ForCausalLM", {**_LLAMA_NORMS, **_ATTENTION, **_QK_NORMS, **_MLP}),
    "phi3": Arch("phi3", "Phi3ForCausalLM", {**_LLAMA_NORMS, "attn_qkv": "self_attn.qkv_proj",
                                              "attn_output": "self_attn.o_proj", "ffn_up": "mlp.gate_up_proj",
                                              "ffn_down": "mlp.down_proj"}),
    "gemma2": Arch("gemma2", "Gemma2ForCausalLM", {**_GEMMA_NORMS, **_ATTENTION, **_MLP}, norm_shift=1.0),
    "gemma3": Arch("gemma3_text", "Gemma3ForCausalLM", {**_GEMMA_NORMS, **_ATTENTION, **_QK_NORMS, **_MLP},
                   norm_shift=1.0),
}


def arch_of(meta: dict) -> Arch:
    name = meta.get("general.architecture")
    if name not in ARCHES:
        raise GGUFError(f"GGUF architecture {name!r} is not supported (supported: {', '.join(ARCHES)})")
    return ARCHES[name]


# ---------------------------------------------------------------------------------------------
# Metadata


def float32_value(x: float) -> float:
    """A float32 metadata value as its shortest decimal (9.999999747378752e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


class Fields:
    """The `<arch>.*` metadata keys, read by their name without the prefix; remembers which were read."""

    def __init__(self, meta: dict, arch: str):
        self.meta, self.arch, self.read = meta, arch, set()

    def get(self, name: str, default=None):
        self.read.add(name)
        value = self.meta.get(f"{self.arch}.{name}", default)
        return float32_value(value) if isinstance(value, float) else value

    def need(self, name: str):
        if f"{self.arch}.{name}" not in self.meta:
            raise GGUFError(f"the GGUF metadata has no {self.arch}.{name!r}")
        return self.get(name)

    def refuse_unread(self) -> None:
        """Raise GGUFError naming the first `<arch>.*` key no rule read (one that would change the model)."""
        for key, value in self.meta.items():
            name = key.removeprefix(f"{self.arch}.")
            if name != key and name not in self.read and not (name in HARMLESS and value == HARMLESS[name]):
                raise GGUFError(f"GGUF metadata {key}={value!r} is not supported for architecture {self.arch!r}")


HARMLESS = {"expert_count": 0, "expert_used_count": 0}  # written as 0 by some converters for dense models


def llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes as `rope_freqs.weight` for Llama 3 RoPE."""
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (original / wavelen - low) / (high - low)
    ramp = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, ramp))


def llama3_rope(factors: np.ndarray, theta: float, original: int) -> dict | None:
    """The `rope_type: llama3` parameters that reproduce `rope_freqs.weight` (None: no scaling).

    The file holds the divisors, not the parameters: `factor` is the largest; low/high_freq_factor are
    fitted on the ramp between (or are Llama 3's 1 and 4 when the ramp has under two points); the
    result is accepted only if it recomputes every divisor.
    """
    factors = factors.astype(np.float64)
    factor, head_dim = float(factors.max()), 2 * len(factors)
    if factor == 1.0 and np.all(factors == 1.0):
        return None
    candidates = [(1.0, 4.0)]
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    ramp = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if ramp.sum() >= 2:  # smooth = (original / wavelen - low) / (high - low), linear in original / wavelen
        smooth = (1 / factors[ramp] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(original / wavelen[ramp], smooth, 1)
        low = round(-intercept / slope, 4)
        candidates.insert(0, (low, round(low + 1 / slope, 4)))
    for low, high in candidates:
        if np.allclose(llama3_factors(theta, head_dim, factor, low, high, original), factors, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": float32_value(factor), "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": original}
    raise GGUFError("tensor 'rope_freqs.weight' is not a Llama 3 RoPE scaling qsjax can rebuild "
                    f"(original context {original}; no low/high_freq_factor reproduces it)")


def rope_scaling(fields: Fields, rope_freqs: np.ndarray | None, theta: float) -> dict | None:
    """Hugging Face's `rope_scaling` from `rope.scaling.*` (linear, yarn) or Llama 3's `rope_freqs`."""
    kind = fields.get("rope.scaling.type", "none")
    original = fields.get("rope.scaling.original_context_length")
    fields.get("rope.scaling.finetuned")  # a training note, no effect on the model
    if rope_freqs is not None:
        if kind != "none":
            raise GGUFError(f"both rope_freqs.weight and {fields.arch}.rope.scaling.type={kind!r}: not supported")
        return llama3_rope(rope_freqs, theta, original or 8192)  # 8192: the converter's default
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": fields.need("rope.scaling.factor")}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": fields.need("rope.scaling.factor"),
                   "original_max_position_embeddings": fields.need("rope.scaling.original_context_length")}
        for key, hf in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow")):
            if fields.get(key) is not None:
                scaling[hf] = fields.get(key)
        return scaling
    raise GGUFError(f"GGUF metadata {fields.arch}.rope.scaling.type={kind!r} is not supported "
                    "(supported: none, linear, yarn, and Llama 3's rope_freqs.weight)")


def common_config(arch: Arch, fields: Fields, meta: dict, tensor_names: list[str]) -> dict:
    """The config.json fields of every Llama-like family."""
    hidden, n_head = fields.need("embedding_length"), fields.need("attention.head_count")
    head_dim = fields.get("attention.key_length", hidden // n_head)
    if fields.get("attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{fields.arch}.attention.value_length differs from key_length: not supported")
    if fields.get("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"partial RoPE ({fields.arch}.rope.dimension_count != head_dim {head_dim}) is not supported")
    return {
        "architectures": [arch.class_name],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": fields.need("feed_forward_length"),
        "num_hidden_layers": fields.need("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": fields.get("attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "rms_norm_eps": fields.need("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": fields.need("context_length"),
        "vocab_size": fields.get("vocab_size", len(meta.get("tokenizer.ggml.tokens", []))),
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def _llama_family(fields, config, tensor_names, rope_freqs) -> dict:
    theta = fields.get("rope.freq_base", 10000.0)
    has = lambda suffix: any(name.endswith(suffix) for name in tensor_names)  # noqa: E731
    return {"hidden_act": "silu", "rope_theta": theta, "rope_scaling": rope_scaling(fields, rope_freqs, theta),
            "attention_bias": has("attn_q.bias") and config["model_type"] != "qwen2", "mlp_bias": has("ffn_up.bias")}


def _qwen_family(fields, config, tensor_names, rope_freqs) -> dict:
    return {**_llama_family(fields, config, tensor_names, rope_freqs), "use_sliding_window": False}


def _phi3_family(fields, config, tensor_names, rope_freqs) -> dict:
    window = fields.get("attention.sliding_window", 0)  # llama.cpp's converter writes 0 for none
    original = fields.get("rope.scaling.original_context_length", config["max_position_embeddings"])
    return {**_llama_family(fields, config, tensor_names, rope_freqs), "sliding_window": window or None,
            "original_max_position_embeddings": original}


def _gemma_family(fields, config, every_kind: int) -> dict:
    """What Gemma 2 and 3 share. llama.cpp scales the queries by 1/sqrt(head_dim), but by
    1/sqrt(hidden / heads) for the 27B models (told apart by their layer count)."""
    big = config["num_hidden_layers"] == {"gemma2": 46, "gemma3_text": 62}[config["model_type"]]
    scalar = config["hidden_size"] // config["num_attention_heads"] if big else config["head_dim"]
    window = fields.get("attention.sliding_window", 0)
    pattern = fields.get("attention.sliding_window_pattern", every_kind)
    layers = range(config["num_hidden_layers"])
    sliding = list(pattern) if isinstance(pattern, list) else [(i + 1) % pattern != 0 for i in layers]
    if len(sliding) != len(layers):
        raise GGUFError(f"{fields.arch}.attention.sliding_window_pattern has {len(sliding)} entries, not one per layer")
    return {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar, "sliding_window": window or None,
            "layer_types": ["sliding_attention" if s and window else "full_attention" for s in sliding],
            "final_logit_softcapping": fields.get("final_logit_softcapping")}


def _gemma2_family(fields, config, tensor_names, rope_freqs) -> dict:
    theta = fields.get("rope.freq_base", 10000.0)
    return {**_gemma_family(fields, config, 2), "rope_theta": theta, "rope_scaling": rope_scaling(fields, None, theta),
            "attn_logit_softcapping": fields.get("attn_logit_softcapping")}


def _gemma3_family(fields, config, tensor_names, rope_freqs) -> dict:
    theta = fields.get("rope.freq_base", 1e6)
    return {**_gemma_family(fields, config, 6), "rope_theta": theta, "rope_scaling": rope_scaling(fields, None, theta),
            "rope_local_base_freq": fields.get("rope.freq_base_swa", 10000.0)}  # llama.cpp's fixed local base


FAMILIES = {"llama": _llama_family, "qwen2": _qwen_family, "qwen3": _qwen_family, "phi3": _phi3_family,
            "gemma2": _gemma2_family, "gemma3": _gemma3_family}


def hf_config(meta: dict, tensor_names: list[str], rope_freqs: np.ndarray | None = None) -> dict:
    """A Hugging Face config.json (as a dict) from the `<arch>.*` and `tokenizer.ggml.*` metadata;
    `rope_freqs`: the `rope_freqs.weight` tensor of a Llama 3 file."""
    arch = arch_of(meta)
    name = meta["general.architecture"]
    if rope_freqs is not None and name != "llama":
        raise GGUFError(f"tensor 'rope_freqs.weight' is not supported for architecture {name!r}")
    fields = Fields(meta, name)
    config = common_config(arch, fields, meta, tensor_names)
    config.update(FAMILIES[name](fields, config, tensor_names, rope_freqs))
    fields.refuse_unread()
    return config
