"""The transformer's math as small pure functions over arrays (attention: `qsjax.dense.attention`).

Shapes: B batch, T query positions, S key positions, D model width, H query heads,
K key/value heads, G = H // K query heads per key/value head, Dh head width, F MLP width.
Norms and the attention softmax run in float32 whatever the parameter dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def linear(x, w, b=None):
    """x @ w + b.  [..., D_in] @ [D_in, D_out] -> [..., D_out]"""
    y = x @ w
    return y if b is None else y + b


def fuse_qkv(wq, wk, wv, n_kv_heads: int):
    """Llama's query, key and value maps as one, columns grouped by key/value head: group k holds
    [q_(kG) .. q_(kG+G-1), k_k, v_k], Dh columns each (query head h = k G + g, as in `grouped_scores`),
    so that a split over whole groups keeps every head with its keys and values.
    [..., H Dh], [..., K Dh], [..., K Dh] (weights [D, .] or biases) -> [..., K (G + 2) Dh]"""
    lead, K = wq.shape[:-1], n_kv_heads
    group = lambda w: w.reshape(*lead, K, -1, wk.shape[-1] // K)  # [..., K, G or 1, Dh]
    return jnp.concatenate([group(wq), group(wk), group(wv)], axis=-2).reshape(*lead, -1)


def split_qkv(y, n_kv_heads: int, head_dim: int):
    """The outputs of `fuse_qkv`'s map.  y [B, T, K (G + 2) Dh] -> q [B, T, H, Dh], k, v [B, T, K, Dh]"""
    B, T, _ = y.shape
    y = y.reshape(B, T, n_kv_heads, -1, head_dim)  # [B, T, K, G + 2, Dh]
    return y[..., :-2, :].reshape(B, T, -1, head_dim), y[..., -2, :], y[..., -1, :]


def fuse_gate_up(w_gate, w_up):
    """Llama's gate and up maps as one, their columns interleaved (gate_f, up_f), so that a split of
    the columns in whole pairs is a split of F.  [..., F] x 2 -> [..., 2F]"""
    return jnp.stack([w_gate, w_up], axis=-1).reshape(*w_gate.shape[:-1], -1)


def swiglu(y):
    """silu(gate) * up from `fuse_gate_up`'s map.  y [..., 2F] -> [..., F]"""
    y = y.reshape(*y.shape[:-1], -1, 2)
    return silu(y[..., 0]) * y[..., 1]


def geglu(y):
    """gelu_tanh(gate) * up from `fuse_gate_up`'s map (Gemma).  y [..., 2F] -> [..., F]"""
    y = y.reshape(*y.shape[:-1], -1, 2)
    return gelu_tanh(y[..., 0]) * y[..., 1]


def layer_norm(x, scale, bias, eps):
    """GPT-2's LayerNorm: (x - mean) / sqrt(var + eps) * scale + bias.  [..., D] -> [..., D]"""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale + bias).astype(x.dtype)


def rms_norm(x, scale, eps):
    """Llama's RMSNorm: x / sqrt(mean(x^2) + eps) * scale.  [..., D] -> [..., D]"""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return scale * y.astype(x.dtype)


def rms_norm_plus_one(x, scale, eps):
    """Gemma's RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + scale), all in float32.  [..., D] -> [..., D]"""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def softcap(x, cap: float):
    """cap tanh(x / cap): values squashed into (-cap, cap) (Gemma 2's scores and logits)."""
    return cap * jnp.tanh(x / cap)


def gelu_tanh(x):
    """GPT-2's GELU, tanh approximation."""
    return 0.5 * x * (1.0 + jnp.tanh(jnp.sqrt(2.0 / jnp.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x * jax.nn.sigmoid(x)


def grouped_scores(q, k):
    """q.k / sqrt(Dh) for grouped key/value heads, in float32.
    q [B, T, H, Dh], k [B, S, K, Dh] -> [B, K, G, T, S] (query head h = k G + g)"""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    return scores / jnp.sqrt(jnp.float32(Dh))
