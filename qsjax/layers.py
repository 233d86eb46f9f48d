"""The transformer's math as small pure functions over arrays.

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


def gelu_tanh(x):
    """GPT-2's GELU, tanh approximation."""
    return 0.5 * x * (1.0 + jnp.tanh(jnp.sqrt(2.0 / jnp.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x * jax.nn.sigmoid(x)


def attend(q, k, v, mask, bias=None):
    """Scaled dot-product attention with grouped key/value heads.

    q: [B, T, H, Dh], k and v: [B, S, K, Dh], mask: [B, T, S] bool (True = may attend),
    bias: optional [B, T, S] or [B, 1, S] float added to the scores.  -> [B, T, H, Dh]

    Masked scores are set to the most negative float rather than -inf, so a row with no visible
    key (a padding query) gets a harmless uniform average instead of NaN.
    """
    B, T, H, Dh = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, Dh)  # [B, T, K, G, Dh]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(Dh))  # [B, K, G, T, S]
    if bias is not None:
        scores = scores + bias[:, None, None]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # [B, T, K, G, Dh]
    return out.reshape(B, T, H, Dh)


def causal_mask(q_slots, k_slots, k_valid):
    """Query at slot i sees key slot j when j <= i and j holds a real token.

    q_slots: [T] int, k_slots: [S] int, k_valid: [B, S] bool  ->  [B, T, S] bool
    """
    return (k_slots[None, None, :] <= q_slots[None, :, None]) & k_valid[:, None, :]


def attend_causal(q, k, v, mask, bias=None, block: int = 128):
    """`attend` for a causal window (query slot i = key slot i), by blocks of `block` queries: block
    j only scores keys 0..(j+1) block - 1, since later keys are masked for all its queries anyway.
    Same result as `attend`; about half the work and a far smaller score tensor per step (2.6x
    faster at 1024 tokens, 3.7x at 2048 on a 2-core CPU).

    q: [B, T, H, Dh], k and v: [B, T, K, Dh], mask: [B, T, T], bias: [B, 1 or T, T]  ->  [B, T, H, Dh]"""
    T = q.shape[1]
    if T <= block:
        return attend(q, k, v, mask, bias)
    outs = []
    for s in range(0, T, block):
        e = min(T, s + block)
        b = None if bias is None else bias[:, s:e, :e] if bias.shape[1] == T else bias[:, :, :e]
        outs.append(attend(q[:, s:e], k[:, :e], v[:, :e], mask[:, s:e, :e], b))
    return jnp.concatenate(outs, axis=1)
