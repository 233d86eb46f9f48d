"""Flax NNX modules: they hold the parameters and wire the pure functions of `layers`.

Blocks are kept one module per layer (`nnx.List`): decoding reads each layer's weights in place,
whereas slicing a layer out of stacked [L, ...] weights makes XLA copy every weight on every step.
A full-window pass may stack them inside jit and `lax.scan` over layers (one copy of the weights
per call, cheap next to the window's compute, and much faster to compile).
Linear weights are stored [D_in, D_out]: y = x @ w.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from qsjax import layers
from qsjax.config import ModelConfig
from qsjax.rope import apply_rope
from qsjax.sharding import constrain_batch


def _param(shape, dtype):
    return nnx.Param(jnp.zeros(shape, dtype))


def _value(p):
    return None if p is None else p[...]


class Linear(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, bias: bool, stack: tuple = (), dtype=jnp.float32):
        self.w = _param(stack + (d_in, d_out), dtype)
        self.b = _param(stack + (d_out,), dtype) if bias else None

    def __call__(self, x, bits=None):
        """`bits` (per-token weight widths) is for quantized layers; full-precision weights ignore it."""
        return layers.linear(x, self.w[...], _value(self.b))


class LayerNorm(nnx.Module):
    def __init__(self, d: int, eps: float, *, stack: tuple = (), dtype=jnp.float32):
        self.eps = eps
        self.scale = _param(stack + (d,), dtype)
        self.bias = _param(stack + (d,), dtype)

    def __call__(self, x):
        return layers.layer_norm(x, self.scale[...], self.bias[...], self.eps)


class RMSNorm(nnx.Module):
    def __init__(self, d: int, eps: float, *, stack: tuple = (), dtype=jnp.float32):
        self.eps = eps
        self.scale = _param(stack + (d,), dtype)

    def __call__(self, x):
        return layers.rms_norm(x, self.scale[...], self.eps)


class GPT2Block(nnx.Module):
    """Pre-LayerNorm block: x += attn(ln1(x)); x += mlp(ln2(x)).  Positions enter at the embedding."""

    def __init__(self, cfg: ModelConfig, *, stack: tuple = (), dtype=jnp.float32):
        D, F = cfg.d_model, cfg.d_ff
        self.n_heads = cfg.n_heads
        self.ln1 = LayerNorm(D, cfg.norm_eps, stack=stack, dtype=dtype)
        self.qkv_proj = Linear(D, 3 * D, bias=True, stack=stack, dtype=dtype)
        self.out_proj = Linear(D, D, bias=True, stack=stack, dtype=dtype)
        self.ln2 = LayerNorm(D, cfg.norm_eps, stack=stack, dtype=dtype)
        self.fc = Linear(D, F, bias=True, stack=stack, dtype=dtype)
        self.proj = Linear(F, D, bias=True, stack=stack, dtype=dtype)

    def qkv(self, x, cos, sin, bits=None):
        """[B, T, D] -> q, k, v each [B, T, H, Dh]"""
        B, T, D = x.shape
        q, k, v = jnp.split(self.qkv_proj(self.ln1(x), bits), 3, axis=-1)
        heads = lambda y: y.reshape(B, T, self.n_heads, D // self.n_heads)
        return heads(q), heads(k), heads(v)

    def q(self, x, cos, sin, bits=None):
        """Queries alone.  [B, n, D] -> [B, n, H, Dh]"""
        return self.qkv(x, cos, sin, bits)[0]

    def kv(self, x, cos, sin, bits=None):
        """Keys and values alone.  [B, T, D] -> two [B, T, H, Dh]"""
        return self.qkv(x, cos, sin, bits)[1:]

    def attn_out(self, o, bits=None):
        """[B, T, H, Dh] -> [B, T, D]"""
        return self.out_proj(o.reshape(*o.shape[:2], -1), bits)

    def mlp(self, x, bits=None):
        """proj(gelu(fc(ln2(x)))).  [B, T, D] -> [B, T, F] -> [B, T, D]"""
        return self.proj(layers.gelu_tanh(self.fc(self.ln2(x), bits)), bits)


class LlamaBlock(nnx.Module):
    """x += attn(rmsnorm(x)) with RoPE and grouped key/value heads; x += swiglu(rmsnorm(x))."""

    def __init__(self, cfg: ModelConfig, *, stack: tuple = (), dtype=jnp.float32):
        D, F, Dh = cfg.d_model, cfg.d_ff, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, Dh
        kw = dict(stack=stack, dtype=dtype)
        self.attn_norm = RMSNorm(D, cfg.norm_eps, **kw)
        self.q_proj = Linear(D, cfg.n_heads * Dh, bias=cfg.attn_bias, **kw)
        self.k_proj = Linear(D, cfg.n_kv_heads * Dh, bias=cfg.attn_bias, **kw)
        self.v_proj = Linear(D, cfg.n_kv_heads * Dh, bias=cfg.attn_bias, **kw)
        self.o_proj = Linear(cfg.n_heads * Dh, D, bias=cfg.attn_bias, **kw)
        self.mlp_norm = RMSNorm(D, cfg.norm_eps, **kw)
        self.gate_proj = Linear(D, F, bias=cfg.mlp_bias, **kw)
        self.up_proj = Linear(D, F, bias=cfg.mlp_bias, **kw)
        self.down_proj = Linear(F, D, bias=cfg.mlp_bias, **kw)

    def qkv(self, x, cos, sin, bits=None):
        """[B, T, D] -> q [B, T, H, Dh], k and v [B, T, K, Dh], RoPE applied to q and k"""
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h, bits).reshape(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(h, bits).reshape(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(h, bits).reshape(B, T, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def q(self, x, cos, sin, bits=None):
        """Queries alone (RoPE applied).  [B, n, D] -> [B, n, H, Dh]"""
        B, n, _ = x.shape
        return apply_rope(self.q_proj(self.attn_norm(x), bits).reshape(B, n, self.n_heads, self.head_dim), cos, sin)

    def kv(self, x, cos, sin, bits=None):
        """Keys (RoPE applied) and values alone.  [B, T, D] -> two [B, T, K, Dh]"""
        B, T, _ = x.shape
        h = self.attn_norm(x)
        k = self.k_proj(h, bits).reshape(B, T, self.n_kv_heads, self.head_dim)
        return apply_rope(k, cos, sin), self.v_proj(h, bits).reshape(B, T, self.n_kv_heads, self.head_dim)

    def attn_out(self, o, bits=None):
        """[B, T, H, Dh] -> [B, T, D]"""
        return self.o_proj(o.reshape(*o.shape[:2], -1), bits)

    def mlp(self, x, bits=None):
        """down(silu(gate(h)) * up(h)), h = rmsnorm(x).  [B, T, D] -> [B, T, F] -> [B, T, D]"""
        h = self.mlp_norm(x)
        return self.down_proj(layers.silu(self.gate_proj(h, bits)) * self.up_proj(h, bits), bits)


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
            self.blocks = nnx.List([LlamaBlock(cfg, dtype=dtype) for _ in range(L)])
            self.final_norm = RMSNorm(D, cfg.norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_embeddings else _param((D, V), dtype)
        self.mesh = None  # a jax Mesh once the parameters are sharded (qsjax.sharding.shard_model)

    def embed(self, tokens, positions):
        """tokens, positions [B, T] int -> x [B, T, D]"""
        x = self.tok_embed[...][tokens]
        if self.pos_embed is not None:
            x = x + self.pos_embed[...][positions]
        return constrain_batch(x, self.mesh)  # later activations inherit the split (XLA propagation)

    def logits(self, x):
        """Final norm and LM head, in float32.  [..., D] -> [..., V]"""
        h = self.final_norm(x)
        if self.lm_head is None:  # tied: contract with the [V, D] embedding as stored, no transpose
            return jnp.einsum("...d,vd->...v", h, self.tok_embed[...], preferred_element_type=jnp.float32)
        return jnp.matmul(h, self.lm_head[...], preferred_element_type=jnp.float32)
