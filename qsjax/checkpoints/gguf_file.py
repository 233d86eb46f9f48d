"""Reading a llama.cpp GGUF file as Hugging Face pieces: tensors dequantized to float32 under
Hugging Face names, a config.json, and a tokenizer.json (see qsjax.convert, which writes
them out as a model directory; the architectures and their differences: qsjax.checkpoints.gguf_arch).

What differs between the two layouts:

- GGUF lists a tensor's dimensions innermost first; read in numpy order they already are
  Hugging Face's `[out_features, in_features]`.
- For Llama only, llama.cpp permutes the rows of q_proj and k_proj so that its interleaved RoPE
  matches the half-split ("rotate_half") RoPE of Hugging Face Llama; `unpermute_rows` undoes that.
- For Gemma, llama.cpp stores each RMSNorm weight as (1 + w); the shift is subtracted back.
- Llama 3's RoPE scaling is a `rope_freqs.weight` tensor, turned back into config parameters.
- Tied embeddings: llama.cpp writes no `output.weight` when the LM head is the embedding matrix.
"""

import re
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm

from qsjax.checkpoints.gguf_arch import ARCHES, Arch, GGUFError, arch_of, hf_config

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

ROPE_FREQS = "rope_freqs.weight"  # Llama 3's RoPE scaling, read into the config
BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# llama.cpp token types (tokenizer.ggml.token_type); 5 unused and 6 byte ("<0x0A>") need no rule.
NORMAL_TOKEN, UNKNOWN_TOKEN, CONTROL_TOKEN, USER_DEFINED_TOKEN = 1, 2, 3, 4
SPM_SPACE = "\u2581"  # how SentencePiece writes a space


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


def hf_tensor_name(gguf_name: str, arch: Arch = ARCHES["llama"]) -> str:
    """The Hugging Face name of a GGUF tensor; raises GGUFError for a name we do not know."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = BLOCK_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in arch.modules:
        layer, module, kind = match.groups()
        return f"model.layers.{layer}.{arch.modules[module]}.{kind}"
    raise GGUFError(f"unknown GGUF tensor {gguf_name!r}: not part of a {arch.model_type} model")


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


def expected_shapes(config: dict, arch: Arch) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor a model of this architecture and config has, with its shape."""
    d, ff, vocab, head_dim = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["head_dim"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, d)
    module_shapes = {
        "self_attn.q_proj": (q_out, d), "self_attn.k_proj": (kv_out, d), "self_attn.v_proj": (kv_out, d),
        "self_attn.qkv_proj": (q_out + 2 * kv_out, d), "self_attn.o_proj": (d, q_out),
        "self_attn.q_norm": (head_dim,), "self_attn.k_norm": (head_dim,),
        "mlp.gate_proj": (ff, d), "mlp.up_proj": (ff, d), "mlp.gate_up_proj": (2 * ff, d), "mlp.down_proj": (d, ff),
    }
    attention_bias, mlp_bias = config.get("attention_bias", False), config.get("mlp_bias", False)
    for i in range(config["num_hidden_layers"]):
        for module in arch.modules.values():
            name = f"model.layers.{i}.{module}"
            shapes[f"{name}.weight"] = module_shapes.get(module, (d,))  # the norms not listed: (d,)
            qkv = module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            if (qkv and arch.qkv_bias) or (attention_bias and module.startswith("self_attn") and "norm" not in module) \
                    or (mlp_bias and module.startswith("mlp")):
                shapes[f"{name}.bias"] = shapes[f"{name}.weight"][:1]
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
    """All tensors of the file as float32 arrays under Hugging Face names, in Hugging Face's layout:
    Q/K rows un-permuted (Llama), norms un-shifted (Gemma); `rope_freqs.weight` is in the config."""
    arch = ARCHES[read_metadata(reader)["general.architecture"]]
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    tensors = {}
    for tensor in tqdm(reader.tensors, desc="converting", unit="tensor", disable=not progress, file=sys.stderr):
        if tensor.name == ROPE_FREQS:
            continue
        name = hf_tensor_name(tensor.name, arch)
        if name in tensors:
            raise GGUFError(f"tensor {tensor.name!r} appears twice")
        value = tensor_to_float32(tensor)
        module = name.split(".")[-2]
        if arch.permute_qk and module in heads:
            value = unpermute_rows(value, heads[module])
        if arch.norm_shift and tensor.name.endswith("norm.weight"):
            value = value - np.float32(arch.norm_shift)
        tensors[name] = value
    check_shapes(tensors, expected_shapes(config, arch))
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


def model_config(reader: gguf.GGUFReader, meta: dict) -> dict:
    """The Hugging Face config.json of the file (gguf_arch.hf_config), Llama 3's rope_freqs included."""
    arch_of(meta)  # an unsupported architecture is named before anything else
    names = [tensor.name for tensor in reader.tensors]
    rope_freqs = next((tensor_to_float32(t) for t in reader.tensors if t.name == ROPE_FREQS), None)
    return hf_config(meta, names, rope_freqs)


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


def adds_token(meta: dict, kind: str) -> bool:
    """Whether encoding adds the bos / eos token; llama.cpp adds BOS to a SentencePiece vocabulary
    whose file does not say otherwise."""
    default = kind == "bos" and meta.get("tokenizer.ggml.model") == "llama"
    return bool(meta.get(f"tokenizer.ggml.add_{kind}_token", default)) and special_token(meta, kind) is not None


def tokens_of_types(tokens: list[str], token_types: list[int], kinds: tuple[int, ...], *, special: bool) -> list[AddedToken]:
    """The vocabulary entries of some llama.cpp token types, as added tokens matched whole in text."""
    return [
        AddedToken(token, special=special, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token_type in kinds
    ]


def byte_level_bpe(meta: dict, tokens: list[str], token_types: list[int]) -> Tokenizer:
    """llama.cpp's "gpt2" vocabulary: byte-level BPE with the file's merges."""
    merges = [tuple(merge.split(" ")) for merge in metadata_value(meta, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def sentencepiece_merges(tokens: list[str], scores: list[float], token_types: list[int]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece BPE, which has scores instead of merges.

    SentencePiece (llama.cpp's "llama" vocabulary) repeatedly joins the adjacent pair whose join is
    a normal piece with the highest score. As BPE merges: every split of a normal piece into two
    normal pieces, ranked by the piece's score, best first (ties: the earlier piece).
    """
    normal = {token: i for i, token in enumerate(tokens) if token_types[i] == NORMAL_TOKEN}
    ranked = sorted(normal, key=lambda token: (-scores[normal[token]], normal[token]))
    return [
        (token[:cut], token[cut:])
        for token in ranked
        for cut in range(1, len(token))
        if token[:cut] in normal and token[cut:] in normal
    ]


def sentencepiece_bpe(meta: dict, tokens: list[str], token_types: list[int]) -> Tokenizer:
    """llama.cpp's "llama" vocabulary: SentencePiece BPE, spaces written as "▁", a "▁" put
    before the text (and after each special token) unless `add_space_prefix` is false, and the
    characters the vocabulary lacks spelled as byte tokens ("<0x0A>")."""
    scores = metadata_value(meta, "tokenizer.ggml.scores")
    tokenizer = Tokenizer(models.BPE(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=sentencepiece_merges(tokens, scores, token_types),
        unk_token=special_token(meta, "unknown"),
        fuse_unk=True,
        byte_fallback=True,
    ))  # fmt: skip
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPM_SPACE)] * prefix + [normalizers.Replace(" ", SPM_SPACE)]
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + [decoders.Strip(" ", 1, 0)] * prefix
    )
    return tokenizer


TOKENIZER_MODELS = {"gpt2": byte_level_bpe, "llama": sentencepiece_bpe}


def build_tokenizer(meta: dict) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the vocabulary the metadata describes."""
    model = metadata_value(meta, "tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise GGUFError(f"tokenizer model {model!r} is not supported "
                        "(supported: 'gpt2', byte-level BPE; 'llama', SentencePiece BPE)")
    tokens = metadata_value(meta, "tokenizer.ggml.tokens")
    token_types = meta.get("tokenizer.ggml.token_type") or [NORMAL_TOKEN] * len(tokens)
    tokenizer = TOKENIZER_MODELS[model](meta, tokens, token_types)
    tokenizer.add_special_tokens(tokens_of_types(tokens, token_types, (UNKNOWN_TOKEN, CONTROL_TOKEN), special=True))
    tokenizer.add_tokens(tokens_of_types(tokens, token_types, (USER_DEFINED_TOKEN,), special=False))
    ends = {kind: special_token(meta, kind) for kind in ("bos", "eos") if adds_token(meta, kind)}
    if ends:
        def around(part: str) -> str:  # "<s> $A </s>", with the ends the file asks for
            return " ".join(filter(None, (ends.get("bos"), part, ends.get("eos"))))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=around("$A"),
            pair=f"{around('$A')} {around('$B')}",
            special_tokens=[(token, meta[f"tokenizer.ggml.{kind}_token_id"]) for kind, token in ends.items()],
        )
    return tokenizer


def tokenizer_config(meta: dict, max_length: int) -> dict:
    """tokenizer_config.json: special tokens, whether to add BOS, and the chat template."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special_token(meta, "bos"),
        "eos_token": special_token(meta, "eos"),
        "unk_token": special_token(meta, "unknown"),
        "pad_token": special_token(meta, "padding"),
        "add_bos_token": adds_token(meta, "bos"),
        "add_eos_token": adds_token(meta, "eos"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config
