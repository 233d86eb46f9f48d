"""Flax NNX modules: they hold the parameters, nothing else (the math is in `layers` and `blocks`).

Blocks are kept one module per layer (`nnx.List`): decoding reads each layer's weights in place,
whereas slicing a layer out of stacked [L, ...] weights makes XLA copy every weight on every step.
A full-window pass may stack them inside jit and `lax.scan` over layers (`model.scan_layers`).
Linear weights are stored [D_in, D_out]: y = x @ w.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from qsjax.dense import layers
from qsjax.dense.attention import Rule
from qsjax.dense.config import ModelConfig


def _param(shape, dtype):
    return nnx.Param(jnp.zeros(shape, dtype))


class Linear(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, bias: bool, stack: tuple = (), dtype=jnp.float32):
        self.w = _param(stack + (d_in, d_out), dtype)
        self.b = _param(stack + (d_out,), dtype) if bias else None

    def __call__(self, x):
        return layers.linear(x, self.w[...], None if self.b is None else self.b[...])


class LayerNorm(nnx.Module):
    def __init__(self, d: int, eps: float, *, stack: tuple = (), dtype=jnp.float32):
        self.eps = eps
        self.scale = _param(stack + (d,), dtype)
        self.bias = _param(stack + (d,), dtype)

    def __call__(self, x):
        return layers.layer_norm(x, self.scale[...], self.bias[...], self.eps)


class RMSNorm(nnx.Module):
    """offset 1.0: Gemma's norm, scaled by (1 + w) in float32 (`layers.rms_norm_plus_one`)."""

    def __init__(self, d: int, eps: float, *, offset: float = 0.0, stack: tuple = (), dtype=jnp.float32):
        self.eps, self.offset = eps, offset
        self.scale = _param(stack + (d,), dtype)

    def __call__(self, x):
        if self.offset:
            return layers.rms_norm_plus_one(x, self.scale[...], self.eps)
        return layers.rms_norm(x, self.scale[...], self.eps)


class GPT2Block(nnx.Module):
    """ln1, fused qkv, out; ln2, fc, proj (see `blocks.gpt2_*`)."""

    def __init__(self, cfg: ModelConfig, *, stack: tuple = (), dtype=jnp.float32):
        D, F = cfg.d_model, cfg.d_ff
        self.head_dim = cfg.head_dim
        self.ln1 = LayerNorm(D, cfg.norm_eps, stack=stack, dtype=dtype)
        self.qkv_proj = Linear(D, 3 * D, bias=True, stack=stack, dtype=dtype)
        self.out_proj = Linear(D, D, bias=True, stack=stack, dtype=dtype)
        self.ln2 = LayerNorm(D, cfg.norm_eps, stack=stack, dtype=dtype)
        self.fc = Linear(D, F, bias=True, stack=stack, dtype=dtype)
        self.proj = Linear(F, D, bias=True, stack=stack, dtype=dtype)


class LlamaBlock(nnx.Module):
    """attn_norm, fused q/k/v, o projections; mlp_norm, fused gate/up, down (see `blocks.qkv`, `blocks.mlp`).

    The fused maps (one matrix-vector product instead of three, or two, per decoded token) hold their
    columns as `layers.fuse_qkv` (grouped by key/value head) and `layers.fuse_gate_up` (interleaved)
    lay them out; the loader fuses Hugging Face's separate matrices into them.

    The family's options (`ModelConfig`): q_norm and k_norm over each head (None: none),
    post_attn_norm and post_mlp_norm (None: none), and static per layer `rule` (the attention's
    soft-cap and sliding window, `attention.Rule`), `rope_table` (None: the only RoPE table; 0 or 1:
    global or local) and `q_scale` (multiplies q so that attention's 1/sqrt(Dh) gives the family's
    scale; None: 1). Blocks that differ only in these alternate in a pattern (`model.scan_layers`)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0, *, stack: tuple = (), dtype=jnp.float32):
        D, F, Dh = cfg.d_model, cfg.d_ff, cfg.head_dim
        kw = dict(stack=stack, dtype=dtype)
        norm = lambda d: RMSNorm(d, cfg.norm_eps, offset=cfg.norm_offset, **kw)
        self.head_dim, self.n_kv_heads = Dh, cfg.n_kv_heads
        self.activation = cfg.activation
        window = cfg.window(layer)
        self.rule = Rule(softcap=cfg.attn_softcap, sliding=window)
        self.rope_table = None if cfg.local_rope_theta is None else int(window is not None)
        self.q_scale = None if cfg.attn_scale is None else cfg.attn_scale * Dh**0.5
        self.attn_norm = norm(D)
        self.qkv_proj = Linear(D, (cfg.n_heads + 2 * cfg.n_kv_heads) * Dh, bias=cfg.attn_bias or cfg.qkv_bias, **kw)
        self.q_norm = norm(Dh) if cfg.qk_norm else None
        self.k_norm = norm(Dh) if cfg.qk_norm else None
        self.o_proj = Linear(cfg.n_heads * Dh, D, bias=cfg.attn_bias, **kw)
        self.post_attn_norm = norm(D) if cfg.post_norms else None
        self.mlp_norm = norm(D)
        self.gate_up_proj = Linear(D, 2 * F, bias=cfg.mlp_bias, **kw)
        self.down_proj = Linear(F, D, bias=cfg.mlp_bias, **kw)
        self.post_mlp_norm = norm(D) if cfg.post_norms else None


class Transformer(nnx.Module):
    """Token (and, for GPT-2, position) embedding, L blocks, final norm, LM head."""

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32):
        self.cfg = cfg
        D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
        self.tok_embed = _param((V, D), dtype)
        if cfg.arch == "gpt2":
            self.pos_embed = _param((cfg.max_positions, D), dtype)
            self.blocks = nnx.List([GPT2Block(cfg, dtype=dtype) for _ in range(L)])
            self.final_norm = LayerNorm(D, cfg.norm_eps, dtype=dtype)
        else:
            self.pos_embed = None
            self.blocks = nnx.List([LlamaBlock(cfg, layer, dtype=dtype) for layer in range(L)])
            self.final_norm = RMSNorm(D, cfg.norm_eps, offset=cfg.norm_offset, dtype=dtype)
        self.lm_head = None if cfg.tie_embeddings else _param((D, V), dtype)
