"""Rotary position embeddings, Hugging Face's half-split ("rotate_half") convention.

For a head vector x = [x1, x2] (two halves of Dh/2) at position p, with frequencies
w_i = theta^(-2i/Dh):   rope(x) = [x1 cos(p w) - x2 sin(p w),  x2 cos(p w) + x1 sin(p w)].
Scaling: Llama 3 divides the low frequencies by `factor` and blends the middle band; linear divides
them all; YaRN blends interpolated and original frequencies by dimension and scales cos and sin.
A model whose sliding layers have their own base (Gemma 3) has two tables, [global, local].
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from qsjax.dense.config import LinearScaling, ModelConfig, RopeScaling, YarnScaling


def _llama3(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled)


def _yarn(inv_freq: np.ndarray, head_dim: int, theta: float, s: YarnScaling) -> np.ndarray:
    """transformers' `_compute_yarn_parameters`: a linear ramp over the dimensions whose rotations in
    the original context lie between beta_fast and beta_slow."""
    dim_of = lambda rotations: head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
        2 * math.log(theta))
    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return (inv_freq / s.factor) * (1 - extrapolation) + inv_freq * extrapolation


def inverse_frequencies(head_dim: int, theta: float, scaling) -> np.ndarray:
    """w_i = theta^(-2i/Dh), i = 0 .. Dh/2-1, optionally scaled.  -> [Dh/2] float32"""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    if isinstance(scaling, RopeScaling):
        inv_freq = _llama3(inv_freq, scaling)
    elif isinstance(scaling, LinearScaling):
        inv_freq = inv_freq / np.float32(scaling.factor)
    elif isinstance(scaling, YarnScaling):
        inv_freq = _yarn(inv_freq, head_dim, theta, scaling)
    return inv_freq.astype(np.float32)


def _table(positions, head_dim: int, theta: float, scaling):
    """cos and sin of p * w.  positions [B, T] -> two [B, T, Dh/2] float32"""
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta, scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    if isinstance(scaling, YarnScaling) and scaling.attention_factor != 1.0:
        return jnp.cos(angles) * scaling.attention_factor, jnp.sin(angles) * scaling.attention_factor
    return jnp.cos(angles), jnp.sin(angles)


def rope_angles(cfg: ModelConfig, positions):
    """cos and sin of p * w for every position.  positions [B, T] int -> two [B, T, Dh/2] float32,
    or two [B, T, 2, Dh/2] (tables [global, local]) when the sliding layers have their own base."""
    cos, sin = _table(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    if cfg.local_rope_theta is None:
        return cos, sin
    local_cos, local_sin = _table(positions, cfg.head_dim, cfg.local_rope_theta, None)
    return jnp.stack([cos, local_cos], axis=-2), jnp.stack([sin, local_sin], axis=-2)


def pick_table(cos, sin, table: int | None):
    """A block's own table: table 0 or 1 of [B, T, 2, Dh/2] tables; None: the only one."""
    if table is None:
        return cos, sin
    return cos[..., table, :], sin[..., table, :]


def apply_rope(x, cos, sin):
    """Rotate each head's halves.  x [B, T, heads, Dh], cos/sin [B, T, Dh/2] -> [B, T, heads, Dh]"""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
