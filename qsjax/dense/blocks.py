"""The transformer's pieces as functions of its parameters (the modules in `modules` only hold them).

    x^0 = embed(tokens, positions)
    q, k, v = qkv(block, x)                           attention projections (RoPE for Llama)
    x = tail(block, x, attention(q, k, v))           x += out(o); x += mlp(x)
    logits = lm_head(final_norm(x^L))

Every linear map goes through `linear(module, x)`, by default `module(x)`: the seam through which a
caller may apply the same weights differently (e.g. quantized weights at per-token widths) without
the dense code knowing about it.
"""

from __future__ import annotations

import jax.numpy as jnp

from qsjax.dense import layers
from qsjax.dense.modules import GPT2Block, Transformer
from qsjax.dense.rope import apply_rope


def call(module, x):
    """The default linear map: the module's own."""
    return module(x)


def embed(model: Transformer, tokens, positions):
    """tokens, positions [B, T] int -> x [B, T, D]"""
    x = model.tok_embed[...][tokens]
    if model.pos_embed is not None:
        x = x + model.pos_embed[...][positions]
    return x


def lm_logits(model: Transformer, x):
    """Final norm and LM head, in float32.  [..., D] -> [..., V]"""
    h = model.final_norm(x)
    if model.lm_head is None:  # tied: contract with the [V, D] embedding as stored, no transpose
        return jnp.einsum("...d,vd->...v", h, model.tok_embed[...], preferred_element_type=jnp.float32)
    return jnp.matmul(h, model.lm_head[...], preferred_element_type=jnp.float32)


def qkv(blk, x, cos, sin, linear=call):
    """Queries, keys and values of a block.  x [B, T, D] -> q [B, T, H, Dh], k and v [B, T, K, Dh]

    GPT-2: one fused projection of ln1(x) (positions entered at the embedding). Llama: one fused
    projection of rmsnorm(x) (columns grouped by key/value head, `layers.split_qkv`), RoPE on q and k."""
    B, T, _ = x.shape
    Dh = blk.head_dim
    if isinstance(blk, GPT2Block):
        q, k, v = jnp.split(linear(blk.qkv_proj, blk.ln1(x)), 3, axis=-1)
        return q.reshape(B, T, -1, Dh), k.reshape(B, T, -1, Dh), v.reshape(B, T, -1, Dh)
    q, k, v = layers.split_qkv(linear(blk.qkv_proj, blk.attn_norm(x)), blk.n_kv_heads, Dh)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def mlp(blk, x, linear=call):
    """GPT-2: proj(gelu(fc(ln2(x)))); Llama: down(silu(gate(h)) * up(h)), h = rmsnorm(x), gate and up
    one fused projection (`layers.swiglu`).  [B, T, D] -> [B, T, D]"""
    if isinstance(blk, GPT2Block):
        return linear(blk.proj, layers.gelu_tanh(linear(blk.fc, blk.ln2(x))))
    return linear(blk.down_proj, layers.swiglu(linear(blk.gate_up_proj, blk.mlp_norm(x))))


def tail(blk, x, o, linear=call):
    """The residual tail after attention: x += out(o); x += mlp(x).  x [B, T, D], o [B, T, H, Dh] -> [B, T, D]"""
    out = blk.out_proj if isinstance(blk, GPT2Block) else blk.o_proj
    x = x + linear(out, o.reshape(*o.shape[:2], -1))
    return x + mlp(blk, x, linear)
