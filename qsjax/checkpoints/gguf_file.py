"""Reading a llama.cpp GGUF file of a Llama model as Hugging Face pieces: tensors dequantized to
float32 under Hugging Face names, a LlamaConfig, and a byte-level BPE tokenizer (see qsjax.convert,
which writes them out as a model directory).

Three things differ between the two layouts:

- GGUF lists a tensor's dimensions innermost first; read in numpy order they already are
  Hugging Face's `[out_features, in_features]`.
- llama.cpp permutes the rows of q_proj and k_proj so that its interleaved RoPE matches the
  half-split ("rotate_half") RoPE of Hugging Face Llama; `unpermute_rows` undoes that.
- Tied embeddings: llama.cpp writes no `output.weight` when the LM head is the embedding matrix.
"""

import re
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

# Tensor types we dequantize, all with `gguf.quants.dequantize`. The K-quants are the usual
# llama.cpp mixes (Q4_K_M uses Q4_K and Q6_K); the IQ* and ternary types are left out.
SUPPORTED_TYPES = (
    GGMLType.F32, GGMLType.F16, GGMLType.BF16,
    GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
    GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
)  # fmt: skip

# GGUF tensor name -> Hugging Face name, outside the transformer blocks.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# `blk.N.<module>` -> `model.layers.N.<module>`, for weights and biases alike.
BLOCK_MODULES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

CONTROL_TOKEN = 3  # llama.cpp token types: 1 normal, 3 control (special), 4 user-defined
USER_DEFINED_TOKEN = 4


class GGUFError(ValueError):
    """The GGUF file cannot be converted: unreadable, truncated, or describing something unsupported."""


# ---------------------------------------------------------------------------------------------
# Tensors


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (from its convert script); kept here for the tests.

    Within each head it interleaves the two halves of the rows: [x0..x(h/2-1), y0..y(h/2-1)]
    becomes [x0, y0, x1, y1, ...], turning half-split RoPE pairs into adjacent pairs.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_rows`: adjacent row pairs of each head back to two halves.

    `w` is `[n_head * head_dim, ...]` (a q_proj/k_proj weight or bias).
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor; raises GGUFError for a name we do not know."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = BLOCK_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in BLOCK_MODULES:
        layer, module, kind = match.groups()
        return f"model.layers.{layer}.{BLOCK_MODULES[module]}.{kind}"
    if gguf_name == "rope_freqs.weight":
        # Llama 3.1-style RoPE scaling: llama.cpp stores the frequency factors, but the parameters
        # Hugging Face's config needs to recompute them are not in the file.
        raise GGUFError("tensor 'rope_freqs.weight' (Llama 3.1 RoPE scaling) is not supported")
    raise GGUFError(f"unknown GGUF tensor {gguf_name!r}: not part of a Llama model")


def tensor_to_float32(tensor) -> np.ndarray:
    """Dequantize a GGUF `ReaderTensor` to float32 in numpy order, e.g. `[out_features, in_features]`."""
    qtype = GGMLType(tensor.tensor_type)
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise GGUFError(f"tensor {tensor.name!r} has type {qtype.name}, which is not supported ({supported})")
    if tensor.data.nbytes != tensor.n_bytes:
        raise GGUFError(
            f"tensor {tensor.name!r} has {tensor.data.nbytes} bytes instead of {tensor.n_bytes}: the file is truncated"
        )
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    return gguf.quants.dequantize(tensor.data, qtype).astype(np.float32).reshape(shape)


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor a Llama with this config has, with its shape."""
    d, ff, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, d)
    linears = {
        "self_attn.q_proj": (q_out, d),
        "self_attn.k_proj": (kv_out, d),
        "self_attn.v_proj": (kv_out, d),
        "self_attn.o_proj": (d, q_out),
        "mlp.gate_proj": (ff, d),
        "mlp.up_proj": (ff, d),
        "mlp.down_proj": (d, ff),
    }
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        shapes[f"{prefix}.input_layernorm.weight"] = (d,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (d,)
        for module, shape in linears.items():
            shapes[f"{prefix}.{module}.weight"] = shape
            has_bias = config["attention_bias"] if module.startswith("self_attn") else config["mlp_bias"]
            if has_bias:
                shapes[f"{prefix}.{module}.bias"] = shape[:1]
    return shapes


def check_shapes(tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise GGUFError unless `tensors` has exactly the expected names and shapes."""
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise GGUFError(f"tensors do not match the metadata: missing {missing}, unexpected {unexpected}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise GGUFError(f"tensor {name} has shape {tensors[name].shape}, expected {shape}")


def convert_tensors(reader: gguf.GGUFReader, config: dict, *, progress: bool = True) -> dict[str, np.ndarray]:
    """All tensors of the file as float32 arrays under Hugging Face names, Q/K rows un-permuted."""
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    tensors = {}
    for tensor in tqdm(reader.tensors, desc="converting", unit="tensor", disable=not progress, file=sys.stderr):
        name = hf_tensor_name(tensor.name)
        if name in tensors:
            raise GGUFError(f"tensor {tensor.name!r} appears twice")
        value = tensor_to_float32(tensor)
        module = name.split(".")[-2]
        if module in heads:
            value = unpermute_rows(value, heads[module])
        tensors[name] = value
    check_shapes(tensors, expected_shapes(config))
    return tensors


# ---------------------------------------------------------------------------------------------
# Metadata: config and tokenizer


def open_gguf(path: Path) -> gguf.GGUFReader:
    """Open a GGUF file, turning any parse failure into a GGUFError."""
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader raises ValueError, IndexError, ... on a damaged file
        raise GGUFError(f"cannot read {path}: not a valid GGUF file, or truncated ({error})") from error


def read_metadata(reader: gguf.GGUFReader) -> dict:
    """The key/value metadata of a GGUF file as plain Python values (str, int, float, bool, list)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def metadata_value(meta: dict, key: str):
    """`meta[key]`, raising a GGUFError that names a missing key."""
    if key not in meta:
        raise GGUFError(f"the GGUF metadata has no {key!r}")
    return meta[key]


def float32_value(x: float) -> float:
    """A float32 metadata value as its shortest decimal (9.999999747378752e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def llama_config(meta: dict, tensor_names: list[str]) -> dict:
    """A Hugging Face LlamaConfig (as a dict) from the `llama.*` and `tokenizer.ggml.*` metadata."""
    architecture = metadata_value(meta, "general.architecture")
    if architecture != "llama":
        raise GGUFError(f"GGUF architecture {architecture!r} is not supported (only 'llama')")
    hidden = metadata_value(meta, "llama.embedding_length")
    n_head = metadata_value(meta, "llama.attention.head_count")
    head_dim = meta.get("llama.attention.key_length", hidden // n_head)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise GGUFError("partial RoPE (llama.rope.dimension_count != head_dim) is not supported")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise GGUFError(f"RoPE scaling {meta['llama.rope.scaling.type']!r} is not supported")
    tokens = metadata_value(meta, "tokenizer.ggml.tokens")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": metadata_value(meta, "llama.feed_forward_length"),
        "num_hidden_layers": metadata_value(meta, "llama.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float32_value(metadata_value(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float32_value(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": metadata_value(meta, "llama.context_length"),
        "vocab_size": meta.get("llama.vocab_size", len(tokens)),
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": any(name.endswith("attn_q.bias") for name in tensor_names),
        "mlp_bias": any(name.endswith("ffn_up.bias") for name in tensor_names),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def generation_config(config: dict) -> dict:
    """generation_config.json: the special token ids."""
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}


def byte_level_pre_tokenizer(pre: str):
    """The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre == pre` (byte-level BPE only)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt-2", "default"):
        return byte_level
    if pre == "smollm":  # SmolLM2: every digit is its own pre-token, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise GGUFError(f"tokenizer pre-tokenizer {pre!r} is not supported (supported: smollm, gpt-2, default)")


def special_token(meta: dict, kind: str) -> str | None:
    """The text of the bos / eos / unknown / padding token, or None if the file names none."""
    token_id = meta.get(f"tokenizer.ggml.{kind}_token_id")
    return None if token_id is None else meta["tokenizer.ggml.tokens"][token_id]


def tokens_of_type(tokens: list[str], token_types: list[int], kind: int, *, special: bool) -> list[AddedToken]:
    """The vocabulary entries of one llama.cpp token type, as added tokens matched whole in text."""
    return [
        AddedToken(token, special=special, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token_type == kind
    ]


def build_tokenizer(meta: dict) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the byte-level BPE described by the metadata."""
    model = metadata_value(meta, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"tokenizer model {model!r} is not supported (only 'gpt2', byte-level BPE)")
    tokens = metadata_value(meta, "tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ")) for merge in metadata_value(meta, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    token_types = meta.get("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens(tokens_of_type(tokens, token_types, CONTROL_TOKEN, special=True))
    tokenizer.add_tokens(tokens_of_type(tokens, token_types, USER_DEFINED_TOKEN, special=False))
    bos = special_token(meta, "bos")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def tokenizer_config(meta: dict, max_length: int) -> dict:
    """tokenizer_config.json: special tokens, whether to add BOS, and the chat template."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special_token(meta, "bos"),
        "eos_token": special_token(meta, "eos"),
        "unk_token": special_token(meta, "unknown"),
        "pad_token": special_token(meta, "padding"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config
