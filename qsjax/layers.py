"""The transformer's math as small pure functions over arrays (attention: `qsjax.attention`).

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


def grouped_scores(q, k):
    """q.k / sqrt(Dh) for grouped key/value heads, in float32.
    q [B, T, H, Dh], k [B, S, K, Dh] -> [B, K, G, T, S] (query head h = k G + g)"""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    return scores / jnp.sqrt(jnp.float32(Dh))
