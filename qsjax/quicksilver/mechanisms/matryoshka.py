"""Adaptive Matryoshka Quantization: one int8 copy of each weight, nested 4- and 2-bit views.

A weight W [D_in, D_out] is stored once as int8 codes with a float scale per output channel:

    s_j = max_i |W_ij| / 127,        q_ij = clamp(round(W_ij / s_j), -127, 127)      (int8)

The r-bit view keeps the r most significant bits of each code (r in {8, 4, 2}), rounding to
nearest and clamping to the r-bit range, and is dequantized with the same scale:

    q^(r)_ij = clamp(round(q_ij / 2^(8-r)), -2^(r-1), 2^(r-1) - 1) * 2^(8-r),    W^(r) = s * q^(r)

Each token picks its width from its entropy H (bits) at layer l_q (QuickSilver's rule):

    r = 8 if H > tau_high,   4 if tau_low <= H <= tau_high,   2 if H < tau_low

and uses W^(r) in every linear layer from l_q up. Only the int8 codes and the scales are kept in
memory (4x smaller than float32); views are formed inside the compiled program.

That is the naive store. The calibrated store (`nested`, built by `calibration`) keeps int8 codes
too, with a step and an offset per group of input rows and output column, clipped so that the
8-, 4- and 2-bit views together reproduce each layer's outputs; its r-bit view is the codes' top
r bits. `QuantizedWeight.group` says which: 0 for the naive per-channel scales.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from qsjax.quicksilver.mechanisms import nested

WIDTHS = nested.WIDTHS  # (8, 4, 2)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    codes: jax.Array  # [..., D_in, D_out] int8
    scale: jax.Array  # [..., 1, D_out] float32, one per output channel (naive); [..., 3, G, D_out] steps (nested)
    zero: jax.Array | None = None  # [..., 3, G, D_out] float32 offsets, one per width (nested); None (naive)
    group: int = 0  # input rows per group (nested); 0: the naive per-channel store

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.scale, self.zero) if a is not None)

    def read_nbytes(self, bits: int) -> int:
        """Bytes a product at width `bits` reads: the codes' top `bits` bits, packed, and that width's
        scales (the naive store's one scale per column serves every width; the nested store keeps a
        step and an offset per width)."""
        scales = self.scale.nbytes if self.zero is None else (self.scale.nbytes + self.zero.nbytes) // len(WIDTHS)
        return self.codes.size * bits // 8 + scales


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["codes", "scale", "zero"], meta_fields=["group"])


def quantize(w) -> QuantizedWeight:
    """Symmetric int8, one scale per output channel (the last axis)."""
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    codes = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return QuantizedWeight(codes, scale)


def view_codes(codes, bits: int):
    """The `bits` most significant bits of int8 codes, back on the int8 grid (int32 values)."""
    if bits == 8:
        return codes.astype(jnp.int32)
    step = 2 ** (8 - bits)
    top = jnp.clip(jnp.round(codes.astype(jnp.float32) / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (top * step).astype(jnp.int32)


def dequantize(q: QuantizedWeight, bits: int = 8, dtype=jnp.float32):
    """W^(r) = s * q^(r) (naive); the nested grid's view (`nested.dequantize_nested`).  -> [..., D_in, D_out]"""
    if q.group:
        return nested.dequantize_nested(q.codes, q.scale, q.zero, bits, q.group, dtype)
    return (view_codes(q.codes, bits).astype(jnp.float32) * q.scale).astype(dtype)


def choose_bits(entropy, tau_low: float, tau_high: float):
    """Per-token width from entropy in bits: 8 above tau_high, 2 below tau_low, else 4.  [...] -> int32"""
    return jnp.where(entropy > tau_high, 8, jnp.where(entropy < tau_low, 2, 4)).astype(jnp.int32)


def matryoshka_linear(x, q: QuantizedWeight, bits, b=None):
    """y_t = x_t @ W^(r_t) (+ b) with each token's own width r_t (masked reference: every view is
    computed and each token takes its own).  x [..., D_in], bits [...] -> [..., D_out]"""
    y = x @ dequantize(q, 8, x.dtype)
    for r in WIDTHS[1:]:
        y = jnp.where((bits == r)[..., None], x @ dequantize(q, r, x.dtype), y)
    return y if b is None else y + b


def grouped_matryoshka_linear(x, q: QuantizedWeight, bits, b=None):
    """The same as `matryoshka_linear`, computed the fast way: the tokens of each width are gathered
    (bucketed compaction) and multiplied by that width's view only.  x [..., D_in], bits [...]"""
    from qsjax.quicksilver.window.rows import on_rows

    lead, D_out = x.shape[:-1], q.codes.shape[-1]
    flat, widths = x.reshape(-1, x.shape[-1]), bits.reshape(-1)
    # coarse buckets (n, n/4, n/16, ...): this runs inside every compacted layer's own buckets
    zeros = jnp.zeros((flat.shape[0], D_out), x.dtype)
    y = sum(on_rows(lambda rows, r=r: rows @ dequantize(q, r, x.dtype), widths == r, zeros, flat) for r in WIDTHS)
    y = y.reshape(*lead, D_out)
    return y if b is None else y + b


def view_errors(w, q: QuantizedWeight | None = None) -> dict[int, float]:
    """Relative Frobenius error ||W - W^(r)|| / ||W|| of each view."""
    q = quantize(w) if q is None else q
    norm = jnp.linalg.norm(w)
    return {r: float(jnp.linalg.norm(w - dequantize(q, r)) / norm) for r in WIDTHS}


class MatryoshkaLinear(nnx.Module):
    """A linear layer stored as int8 codes + per-channel scales, applied with per-token widths:
    every view masked (the reference) or each width's tokens gathered (`grouped`, the fast path)."""

    def __init__(self, w, b=None, grouped: bool = True, quantizer=quantize):
        q = quantizer(w)
        self.codes = nnx.Param(q.codes)
        self.scale = nnx.Param(q.scale)
        self.zero = None if q.zero is None else nnx.Param(q.zero)
        self.group = q.group
        self.b = None if b is None else nnx.Param(jnp.asarray(b))
        self.grouped = grouped

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes[...], self.scale[...], None if self.zero is None else self.zero[...],
                               self.group)

    def __call__(self, x, bits=None):
        """bits [...] per token (None: the full int8 view for every token)."""
        b = None if self.b is None else self.b[...]
        if bits is None:
            y = x @ dequantize(self.weight, 8, x.dtype)
            return y if b is None else y + b
        return (grouped_matryoshka_linear if self.grouped else matryoshka_linear)(x, self.weight, bits, b)


def with_widths(bits):
    """The linear map (see `qsjax.dense.blocks`) that applies Matryoshka layers at the tokens' widths
    bits [...] (one per row of x) and full-precision layers as they are."""

    def linear(module, x):
        return module(x, bits) if isinstance(module, MatryoshkaLinear) else module(x)

    return linear


def quantize_blocks(module, from_layer: int, grouped: bool = True, store=None) -> int:
    """Replace, in place, every Linear of blocks[from_layer:] by a MatryoshkaLinear (the float
    weights are dropped): naive, or with `store` (`calibration.ClipStore`) the nested grid with its
    learned clipping.  Returns the bytes of int8 storage (codes + scales) now held.
    Scales are per output column, so a fused map (Llama's q/k/v, gate/up) quantizes exactly as its
    separate matrices would, one by one."""
    from qsjax.dense.modules import Linear

    stored = 0
    for layer in range(from_layer, len(module.blocks)):
        blk = module.blocks[layer]
        for name, child in list(vars(blk).items()):
            if isinstance(child, Linear):
                b = None if child.b is None else child.b[...]
                quantizer = quantize if store is None else store.quantizer(layer, name)
                ml = MatryoshkaLinear(child.w[...], b, grouped, quantizer)
                setattr(blk, name, ml)
                stored += ml.weight.nbytes
    return stored


def weight_bytes(module) -> int:
    """Bytes of every parameter the module holds (int8 codes and their scales where quantized)."""
    return sum(a.nbytes for a in jax.tree.leaves(nnx.state(module, nnx.Param)))


def store_report(module) -> dict:
    """Which Matryoshka store a module holds: {"store": "naive" | "calibrated" | None, "group_size"}."""
    groups = {m.group for _, m in nnx.iter_modules(module) if isinstance(m, MatryoshkaLinear)}
    if not groups:
        return {"store": None, "group_size": None}
    group = max(groups)
    return {"store": "calibrated" if group else "naive", "group_size": group or None}
