"""The transformer's pieces as functions of its parameters (the modules in `modules` only hold them).

    x^0 = embed(tokens, positions)
    q, k, v = qkv(block, x)                           attention projections (RoPE for Llama)
    x = tail(block, x, attend(block, q, k, v))       x += out(o); x += mlp(x)
    logits = lm_head(final_norm(x^L))

The Llama-like block carries its family's options (`ModelConfig`, `modules.LlamaBlock`); each is
applied here, in the function every path (dense, QuickSilver) already calls, and off it adds no op:
q/k norms and the score scale in `qkv`, post-norms in `tail`, GeGLU in `mlp`, the embedding scale in
`embed`, final soft-capping in `lm_logits`; the layer's soft-cap and sliding window are its `rule`,
which `attend` (or a caller of `attention`, passing `rule(block)`) hands to attention.

Every linear map goes through `linear(module, x)`, by default `module(x)`: the seam through which a
caller may apply the same weights differently (e.g. quantized weights at per-token widths) without
the dense code knowing about it.
"""

from __future__ import annotations

import jax.numpy as jnp

from qsjax.dense import layers
from qsjax.dense.attention import PLAIN, attention
from qsjax.dense.modules import GPT2Block, Transformer
from qsjax.dense.rope import apply_rope, pick_table


def call(module, x):
    """The default linear map: the module's own."""
    return module(x)


def embed(model: Transformer, tokens, positions):
    """tokens, positions [B, T] int -> x [B, T, D]"""
    x = model.tok_embed[...][tokens]
    if model.pos_embed is not None:
        x = x + model.pos_embed[...][positions]
    if model.cfg.embed_scale is not None:  # rounded to the embedding's dtype first, as transformers does
        x = x * jnp.asarray(model.cfg.embed_scale, x.dtype)
    return x


def lm_logits(model: Transformer, x):
    """Final norm and LM head, in float32.  [..., D] -> [..., V]"""
    h = model.final_norm(x)
    if model.lm_head is None:  # tied: contract with the [V, D] embedding as stored, no transpose
        logits = jnp.einsum("...d,vd->...v", h, model.tok_embed[...], preferred_element_type=jnp.float32)
    else:
        logits = jnp.matmul(h, model.lm_head[...], preferred_element_type=jnp.float32)
    cap = model.cfg.final_softcap
    return logits if cap is None else layers.softcap(logits, cap)


def qkv(blk, x, cos, sin, linear=call):
    """Queries, keys and values of a block.  x [B, T, D] -> q [B, T, H, Dh], k and v [B, T, K, Dh]

    GPT-2: one fused projection of ln1(x) (positions entered at the embedding). Llama: one fused
    projection of rmsnorm(x) (columns grouped by key/value head, `layers.split_qkv`), RoPE on q and k
    (the block's table of cos, sin [B, T, Dh/2] or [B, T, 2, Dh/2], `rope.pick_table`); with the
    family's options, q and k normalised per head before RoPE and q scaled for the family's score scale."""
    B, T, _ = x.shape
    Dh = blk.head_dim
    if isinstance(blk, GPT2Block):
        q, k, v = jnp.split(linear(blk.qkv_proj, blk.ln1(x)), 3, axis=-1)
        return q.reshape(B, T, -1, Dh), k.reshape(B, T, -1, Dh), v.reshape(B, T, -1, Dh)
    q, k, v = layers.split_qkv(linear(blk.qkv_proj, blk.attn_norm(x)), blk.n_kv_heads, Dh)
    if blk.q_norm is not None:
        q, k = blk.q_norm(q), blk.k_norm(k)
    if blk.q_scale is not None:
        q = q * jnp.asarray(blk.q_scale, q.dtype)
    cos, sin = pick_table(cos, sin, blk.rope_table)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def rule(blk):
    """The block's own attention rule (soft-cap, sliding window; `attention.Rule`)."""
    return PLAIN if isinstance(blk, GPT2Block) else blk.rule


def attend(blk, q, k, v, q_slot, k_slot, k_ok, bias=None, **kw):
    """`attention.attention` under the block's rule.  -> [B, T, H, Dh]"""
    return attention(q, k, v, q_slot, k_slot, k_ok, bias, rule=rule(blk), **kw)


def mlp(blk, x, linear=call):
    """GPT-2: proj(gelu(fc(ln2(x)))); Llama: down(silu(gate(h)) * up(h)), h = rmsnorm(x), gate and up
    one fused projection (`layers.swiglu`).  [B, T, D] -> [B, T, D]"""
    if isinstance(blk, GPT2Block):
        return linear(blk.proj, layers.gelu_tanh(linear(blk.fc, blk.ln2(x))))
    glu = layers.geglu if blk.activation == "gelu_tanh" else layers.swiglu
    return linear(blk.down_proj, glu(linear(blk.gate_up_proj, blk.mlp_norm(x))))


def attn_residual(blk, x, o, linear=call):
    """The attention sublayer's residual: x += out(o), or x += norm(out(o)) with post-norms (Gemma).
    x [B, T, D], o [B, T, H, Dh] -> [B, T, D]"""
    proj = blk.out_proj if isinstance(blk, GPT2Block) else blk.o_proj
    out = linear(proj, o.reshape(*o.shape[:2], -1))
    post = None if isinstance(blk, GPT2Block) else blk.post_attn_norm
    return x + (out if post is None else post(out))


def mlp_residual(blk, x, linear=call):
    """The MLP sublayer's residual: x += mlp(x), or x += norm(mlp(x)) with post-norms.  [B, T, D] -> [B, T, D]"""
    post = None if isinstance(blk, GPT2Block) else blk.post_mlp_norm
    out = mlp(blk, x, linear)
    return x + (out if post is None else post(out))


def tail(blk, x, o, linear=call):
    """The residual tail after attention: x += out(o); x += mlp(x) (each through its post-norm when
    the family has them).  x [B, T, D], o [B, T, H, Dh] -> [B, T, D]"""
    return mlp_residual(blk, attn_residual(blk, x, o, linear), linear)
