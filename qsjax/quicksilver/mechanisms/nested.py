"""Nested group-wise grids: one int8 code per weight, every narrower width its top bits.

A weight W [D_in, D_out] is cut into groups of g consecutive input rows; each group and output
column (G = D_in / g groups) has an asymmetric grid, a step s and an offset z, set by a clipping
range [beta * min W, gamma * max W] of that group (gamma, beta in (0, 1]; 1 = min-max):

    s = (gamma max - beta min) / 255,    z = beta min + 128 s,    c = clamp(round((W - z) / s), -128, 127)

The r-bit view keeps the r most significant bits of c (an arithmetic shift, k = 8 - r) and
dequantizes to the middle of the 2^k codes it stands for:

    c^(r) = floor(c / 2^k),    W^(r) = s (2^k c^(r) + (2^k - 1) / 2) + z

so c^(2) = floor(c^(4) / 4): every narrower view is derived from the wider one's codes, and each
view is an r-bit uniform grid over the same range (levels in the middle of its 2^r bins). With
gamma = beta = 1 this is plain min-max quantization. The 4- and 2-bit views may have their own
step and offset, s_r = m_r s and z_r = z + o_r s (m_r = 1, o_r = 0: the grid above), so that their
levels sit where the narrower bins' weights are:

    W^(r) = s_r (2^k c^(r) + (2^k - 1) / 2) + z_r

`calibration` learns gamma, beta, m_r and o_r per group and column (a `clip` dict of [G, D_out]
arrays: gamma, beta, step4, offset4, step2, offset2) so that the 8-, 4- and 2-bit views together
reproduce a layer's outputs. Stored: int8 codes, and each width's s_r, z_r [..., 3, G, D_out].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LEVELS = 255  # int8 steps from -128 to 127
WIDTHS = (8, 4, 2)


def grouped(a, group: int):
    """[..., D_in, D_out] -> [..., D_in / group, group, D_out]"""
    *lead, d_in, d_out = a.shape
    if d_in % group:
        raise ValueError(f"group size {group} does not divide the input dimension {d_in}")
    return a.reshape(*lead, d_in // group, group, d_out)


def group_range(w, group: int):
    """Each group's min and max per output column.  w [..., D_in, D_out] -> lo, hi [..., G, D_out]"""
    g = grouped(jnp.asarray(w, jnp.float32), group)
    return g.min(-2), g.max(-2)


def grid(lo, hi, gamma, beta):
    """The clipped range's step and offset.  [..., G, D_out] each -> s, z"""
    lo, hi = beta * lo, gamma * hi
    s = jnp.maximum(hi - lo, 1e-8) / LEVELS
    return s, lo + 128 * s


def ste(f, x):
    """f(x) forward, identity backward (the straight-through estimator)."""
    return x + jax.lax.stop_gradient(f(x) - x)


def encode(w, s, z, group: int, round_fn=jnp.round):
    """c = clamp(round((W - z) / s), -128, 127), as floats.  w [..., D_in, D_out] -> [..., G, g, D_out]"""
    return jnp.clip(round_fn((grouped(w, group) - z[..., None, :]) / s[..., None, :]), -128, 127)


def top_bits(codes, bits: int, floor_fn=jnp.floor):
    """c^(r) = floor(c / 2^(8-r)): the r most significant bits (as floats; int codes: `view_codes`)."""
    return codes if bits == 8 else floor_fn(codes / 2 ** (8 - bits))


def view_codes(codes, bits: int):
    """The r-bit codes of int8 codes, by an arithmetic shift.  -> int32 in [-2^(r-1), 2^(r-1) - 1]"""
    return jnp.right_shift(codes.astype(jnp.int32), 8 - bits)


def decode(top, bits: int, s, z):
    """W^(r) = s (2^k c^(r) + (2^k - 1) / 2) + z.  top [..., G, g, D_out] -> [..., D_in, D_out]"""
    k = 2 ** (8 - bits)
    w = s[..., None, :] * (k * top + (k - 1) / 2) + z[..., None, :]
    *lead, G, g, d_out = w.shape
    return w.reshape(*lead, G * g, d_out)


def width_grid(s, z, clip: dict | None, bits: int):
    """The r-bit view's own step and offset: s_r = m_r s, z_r = z + o_r s (8 bits, or no clip: s, z)."""
    if bits == 8 or clip is None or f"step{bits}" not in clip:
        return s, z
    return s * clip[f"step{bits}"], z + s * clip[f"offset{bits}"]


def base_grid(w, group: int, clip: dict | None):
    lo, hi = group_range(w, group)
    one = jnp.ones_like(lo)
    return grid(lo, hi, one if clip is None else clip["gamma"], one if clip is None else clip["beta"])


def views(w, clip: dict | None, group: int, widths=WIDTHS, train: bool = False) -> dict:
    """Every width's dequantized view of w under `clip` (None: min-max); `train` rounds with the
    straight-through estimator so that gradients reach the clip's arrays."""
    s, z = base_grid(w, group, clip)
    rnd = (lambda x: ste(jnp.round, x)) if train else jnp.round
    flo = (lambda x: ste(jnp.floor, x)) if train else jnp.floor
    codes = encode(w, s, z, group, rnd)
    return {r: decode(top_bits(codes, r, flo), r, *width_grid(s, z, clip, r)) for r in widths}


def quantize_nested(w, group: int, clip: dict | None = None):
    """int8 codes [..., D_in, D_out]; each width's step and offset [..., 3, G, D_out] (WIDTHS order)."""
    w = jnp.asarray(w, jnp.float32)
    s, z = base_grid(w, group, clip)
    codes = encode(w, s, z, group).astype(jnp.int8).reshape(w.shape)
    per_width = [width_grid(s, z, clip, r) for r in WIDTHS]
    return codes, jnp.stack([a for a, _ in per_width], -3), jnp.stack([b for _, b in per_width], -3)


def dequantize_nested(codes, steps, offsets, bits: int, group: int, dtype=jnp.float32):
    """W^(r) from stored int8 codes and each width's step and offset.  -> [..., D_in, D_out]"""
    i = WIDTHS.index(bits)
    top = view_codes(grouped(codes, group), bits).astype(jnp.float32)
    return decode(top, bits, steps[..., i, :, :], offsets[..., i, :, :]).astype(dtype)


def quantize_alone(w, bits: int, group: int):
    """The baseline: w on its own r-bit min-max grid with the same groups (not a view of int8 codes).
    -> [..., D_in, D_out] dequantized"""
    lo, hi = group_range(w, group)
    n = 2 ** bits - 1
    s = jnp.maximum(hi - lo, 1e-8)[..., None, :] / n
    q = jnp.clip(jnp.round((grouped(jnp.asarray(w, jnp.float32), group) - lo[..., None, :]) / s), 0, n)
    out = q * s + lo[..., None, :]
    return out.reshape(jnp.shape(w))
