"""Load Hugging Face safetensors checkpoints into the model's NNX state, through a strict key map.

Every checkpoint key must match exactly one rule below and every parameter (each part of a fused
one: Llama's q/k/v and gate/up matrices are joined at load time, so checkpoints keep Hugging Face's
layout) must be filled exactly once with the expected shape; anything else raises `WeightError`
naming the key and the shapes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from qsjax.dense import layers
from qsjax.dense.config import ModelConfig
from qsjax.dense.families import load_config
from qsjax.dense.model import Model
from qsjax.dense.modules import Transformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class WeightError(ValueError):
    """A checkpoint does not match the model it claims to be."""


# (checkpoint key regex, parameter path, transpose [out, in] -> [in, out]); {layer} is the regex group.
# GPT-2's Conv1D weights are already [in, out]; Llama's nn.Linear weights are [out, in].
GPT2_KEYS = [
    (r"wte\.weight", "tok_embed", False),
    (r"wpe\.weight", "pos_embed", False),
    (r"h\.(\d+)\.ln_1\.weight", "blocks.{layer}.ln1.scale", False),
    (r"h\.(\d+)\.ln_1\.bias", "blocks.{layer}.ln1.bias", False),
    (r"h\.(\d+)\.attn\.c_attn\.weight", "blocks.{layer}.qkv_proj.w", False),
    (r"h\.(\d+)\.attn\.c_attn\.bias", "blocks.{layer}.qkv_proj.b", False),
    (r"h\.(\d+)\.attn\.c_proj\.weight", "blocks.{layer}.out_proj.w", False),
    (r"h\.(\d+)\.attn\.c_proj\.bias", "blocks.{layer}.out_proj.b", False),
    (r"h\.(\d+)\.ln_2\.weight", "blocks.{layer}.ln2.scale", False),
    (r"h\.(\d+)\.ln_2\.bias", "blocks.{layer}.ln2.bias", False),
    (r"h\.(\d+)\.mlp\.c_fc\.weight", "blocks.{layer}.fc.w", False),
    (r"h\.(\d+)\.mlp\.c_fc\.bias", "blocks.{layer}.fc.b", False),
    (r"h\.(\d+)\.mlp\.c_proj\.weight", "blocks.{layer}.proj.w", False),
    (r"h\.(\d+)\.mlp\.c_proj\.bias", "blocks.{layer}.proj.b", False),
    (r"ln_f\.weight", "final_norm.scale", False),
    (r"ln_f\.bias", "final_norm.bias", False),
]
# Buffers saved by some GPT-2 checkpoints (the causal mask): not weights.
GPT2_IGNORED = [r"h\.\d+\.attn\.(bias|masked_bias)"]

# Llama's separate q/k/v and gate/up matrices each fill one part ("path:part") of a fused parameter;
# they are joined once all are read. Phi-3's fused qkv_proj and gate_up_proj fill several parts
# ("path:q+k+v"), split in Hugging Face's order. Per family, the rules below a parameter the config
# does not have (e.g. q_norm without qk_norm) still refuse its key ("this config has no parameter").
_PROJECTIONS = [
    *[
        (rf"layers\.(\d+)\.{mod}\.{name}_proj\.{kind}", f"blocks.{{layer}}.{target}.{kind[0]}{part}", kind == "weight")
        for mod, name, target, part in (
            ("self_attn", "q", "qkv_proj", ":q"), ("self_attn", "k", "qkv_proj", ":k"), ("self_attn", "v", "qkv_proj", ":v"),
            ("self_attn", "o", "o_proj", ""), ("mlp", "gate", "gate_up_proj", ":gate"), ("mlp", "up", "gate_up_proj", ":up"),
            ("mlp", "down", "down_proj", ""))
        for kind in ("weight", "bias")
    ],
]
_QK_NORMS = [(rf"layers\.(\d+)\.self_attn\.{n}_norm\.weight", f"blocks.{{layer}}.{n}_norm.scale", False) for n in "qk"]
_ENDS = [(r"embed_tokens\.weight", "tok_embed", False), (r"norm\.weight", "final_norm.scale", False),
         (r"lm_head\.weight", "lm_head", True)]
_NORMS = lambda names: [(rf"layers\.(\d+)\.{hf}\.weight", f"blocks.{{layer}}.{ours}.scale", False)
                        for hf, ours in names.items()]
LLAMA_KEYS = [*_ENDS, *_NORMS({"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}),
              *_PROJECTIONS, *_QK_NORMS]
GEMMA_KEYS = [*_ENDS, *_NORMS({"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attn_norm",
                               "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "post_mlp_norm"}),
              *_PROJECTIONS, *_QK_NORMS]
PHI3_KEYS = [*_ENDS, *_NORMS({"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}),
             (r"layers\.(\d+)\.self_attn\.qkv_proj\.weight", "blocks.{layer}.qkv_proj.w:q+k+v", True),
             (r"layers\.(\d+)\.self_attn\.o_proj\.weight", "blocks.{layer}.o_proj.w", True),
             (r"layers\.(\d+)\.mlp\.gate_up_proj\.weight", "blocks.{layer}.gate_up_proj.w:gate+up", True),
             (r"layers\.(\d+)\.mlp\.down_proj\.weight", "blocks.{layer}.down_proj.w", True)]
LLAMA_IGNORED = [r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
KEY_MAPS = {"gpt2": (GPT2_KEYS, GPT2_IGNORED), "llama": (LLAMA_KEYS, LLAMA_IGNORED),
            "mistral": (LLAMA_KEYS, LLAMA_IGNORED), "qwen2": (LLAMA_KEYS, LLAMA_IGNORED),
            "qwen3": (LLAMA_KEYS, LLAMA_IGNORED), "phi3": (PHI3_KEYS, LLAMA_IGNORED),
            "gemma2": (GEMMA_KEYS, LLAMA_IGNORED), "gemma3_text": (GEMMA_KEYS, LLAMA_IGNORED)}

# Fused Llama parameters (by module name) and their parts in order (see `layers.fuse_qkv`, `fuse_gate_up`).
FUSED = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up")}


def key_map(cfg: ModelConfig) -> tuple[list, list]:
    """The (rules, ignored keys) of the config's family."""
    return KEY_MAPS["gpt2" if cfg.arch == "gpt2" else cfg.family]


def _part_width(cfg: ModelConfig, part: str) -> int:
    """The output width of one part of a fused parameter."""
    H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return {"q": H * Dh, "k": K * Dh, "v": K * Dh, "gate": cfg.d_ff, "up": cfg.d_ff}[part]


def _join(cfg: ModelConfig, owner: str, p: dict):
    """The parts of a fused parameter (weights [D, .] or biases), joined."""
    if owner == "qkv_proj":
        return layers.fuse_qkv(p["q"], p["k"], p["v"], cfg.n_kv_heads)
    return layers.fuse_gate_up(p["gate"], p["up"])


def _strip_prefix(key: str) -> str:
    return re.sub(r"^(transformer|model)\.", "", key)


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards named in `model.safetensors.index.json`."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise WeightError(f"{index} is not a safetensors index (a JSON object whose \"weight_map\" maps "
                              "tensor names to file names)")
        files = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise WeightError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = model_dir / name
        try:
            with safe_open(path, framework="flax") as f:
                for key in f.keys():
                    if key in tensors:
                        raise WeightError(f"duplicate key {key!r} in {path}")
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise WeightError(f"cannot read {path}: {e} (truncated or corrupted file? re-download or re-convert it)") from e
    return tensors


def _slots(cfg: ModelConfig, expected: dict) -> dict:
    """What the checkpoint must fill: parameter path -> ShapeDtypeStruct, a fused Llama parameter
    as one slot per part ("path:part", its shape with the part's output width)."""
    slots = {}
    for path, spec in expected.items():
        owner = path.split(".")[-2] if "." in path else None
        if cfg.arch == "gpt2" or owner not in FUSED:
            slots[path] = spec
            continue
        for part in FUSED[owner]:
            slots[f"{path}:{part}"] = jax.ShapeDtypeStruct(tuple(spec.shape[:-1]) + (_part_width(cfg, part),), spec.dtype)
    return slots


def _fuse(cfg: ModelConfig, filled: dict) -> dict:
    """Join the parts of each fused parameter: {"path:part": array} -> {"path": array}."""
    params, parts = {}, {}
    for slot, array in filled.items():
        path, _, part = slot.partition(":")
        if part:
            parts.setdefault(path, {})[part] = array
        else:
            params[path] = array
    for path, p in parts.items():
        params[path] = _join(cfg, path.split(".")[-2], p)
    return params


def map_checkpoint(cfg: ModelConfig, tensors: dict, expected: dict) -> dict:
    """Checkpoint tensors -> nested dict shaped like `expected` (parameter path -> ShapeDtypeStruct)."""
    rules, ignored = key_map(cfg)
    if cfg.tie_embeddings:  # a tied head may still be saved; it is the embedding, not a weight of its own
        ignored = ignored + [r"lm_head\.weight"]
    slots = _slots(cfg, {".".join(map(str, k)): v for k, v in nnx.traversals.flatten_mapping(expected).items()})
    filled: dict[str, jax.Array] = {}
    for key, array in tensors.items():
        short = _strip_prefix(key)
        if any(re.fullmatch(p, short) for p in ignored):
            continue
        for pattern, path, transpose in rules:
            m = re.fullmatch(pattern, short)
            if m:
                break
        else:
            raise WeightError(f"unexpected key {key!r} {tuple(array.shape)} in checkpoint")
        if m.groups():
            path = path.format(layer=m.group(1))
        owner, _, parts = path.partition(":")
        targets = [f"{owner}:{p}" for p in parts.split("+")] if parts else [owner]
        if any(t not in slots for t in targets):
            raise WeightError(f"unexpected key {key!r}: this config has no parameter {owner}")
        want = (*slots[targets[0]].shape[:-1], sum(slots[t].shape[-1] for t in targets))
        got = tuple(array.shape[::-1] if transpose else array.shape)
        if got != tuple(want):
            shown = tuple(want[::-1]) if transpose else tuple(want)
            raise WeightError(f"key {key!r} has shape {tuple(array.shape)}, expected {shown}")
        if any(t in filled for t in targets):
            raise WeightError(f"duplicate key {key!r} (parameter {owner} already loaded)")
        value = jnp.asarray(array.T if transpose else array, slots[targets[0]].dtype)
        ends = np.cumsum([slots[t].shape[-1] for t in targets])[:-1]
        filled.update(zip(targets, jnp.split(value, ends, axis=-1)))
    missing = [p for p in slots if p not in filled]
    if missing:
        key, shape = checkpoint_key(cfg, missing[0], tuple(slots[missing[0]].shape))
        raise WeightError(f"the checkpoint has no tensor {key} (shape {shape}); {len(missing)} missing in all")
    return nnx.traversals.unflatten_mapping({_path_tuple(p): a for p, a in _fuse(cfg, filled).items()})


def checkpoint_key(cfg: ModelConfig, path: str, shape: tuple) -> tuple[str, tuple]:
    """The Hugging Face checkpoint name and shape of parameter (or fused part) `path` (for messages)."""
    rules, prefix = key_map(cfg)[0], "transformer." if cfg.arch == "gpt2" else "model."
    layer = re.search(r"blocks\.(\d+)\.", path)
    generic = path.replace(f"blocks.{layer.group(1)}.", "blocks.{layer}.") if layer else path
    for pattern, rule_path, transpose in rules:
        owner, _, parts = rule_path.partition(":")
        mine, _, part = generic.partition(":")
        if rule_path == generic or (parts and mine == owner and part in parts.split("+")):
            key = pattern.replace(r"(\d+)", layer.group(1) if layer else "").replace("\\", "")
            return ("" if key.startswith("lm_head") else prefix) + key, shape[::-1] if transpose else shape
    return path, shape


def _path_tuple(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def load_model(model_dir: str | Path, dtype: str = "float32") -> Model:
    """Read config.json and the safetensors weights of a Hugging Face directory into a `Model`."""
    model_dir = Path(model_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (choose from {', '.join(DTYPES)})")
    cfg = load_config(model_dir)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, DTYPES[dtype]))
    graphdef, state = nnx.split(abstract)
    params = map_checkpoint(cfg, read_safetensors(model_dir), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, params)
    return Model(cfg, graphdef, state)
