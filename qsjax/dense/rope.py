"""Rotary position embeddings, Hugging Face's half-split ("rotate_half") convention.

For a head vector x = [x1, x2] (two halves of Dh/2) at position p, with frequencies
w_i = theta^(-2i/Dh):   rope(x) = [x1 cos(p w) - x2 sin(p w),  x2 cos(p w) + x1 sin(p w)].
Llama 3 scaling divides the low frequencies by `factor` and blends the middle band.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from qsjax.dense.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """w_i = theta^(-2i/Dh), i = 0 .. Dh/2-1, optionally Llama-3 scaled.  -> [Dh/2] float32"""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    if scaling is None:
        return inv_freq.astype(np.float32)
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_angles(cfg: ModelConfig, positions):
    """cos and sin of p * w for every position.  positions [B, T] int -> two [B, T, Dh/2] float32"""
    inv_freq = jnp.asarray(inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate each head's halves.  x [B, T, heads, Dh], cos/sin [B, T, Dh/2] -> [B, T, heads, Dh]"""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
