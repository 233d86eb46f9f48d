"""Contextual Token Fusion, causal-safe.

At a fusion layer l >= l_min, adjacent eligible tokens t-1, t whose states are near-duplicates,

    cos(h_(t-1)^l, h_t^l) > tau_fuse,

fuse: token t carries on with the size-weighted mean state and size s_t <- s_(t-1) + s_t, and token
t-1 stops there. t-1's own logits, when needed, come from its own state at layer l, never from the
merged one (which has seen token t). Above l a single key/value stands for the group, and attention
adds log(s) to its score (proportional attention, as in ToMe), so the group weighs as its s tokens did.

Only the later token of a pair survives, so a group never contains a token after its representative:
no position's logits can depend on a later token. To keep the rule parallel over positions (and the
same in prefill and in one-token decoding), t may absorb t-1 only if t-1 is not itself a candidate to
absorb t-2 at the same layer, and each token absorbs at most once; groups still grow across layers.
"""

from __future__ import annotations

import jax.numpy as jnp


def cosine(a, b):
    """Cosine similarity of matching rows.  [..., D] x 2 -> [...] float32"""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)


def shift_right(a, fill):
    """a[:, t-1] at position t (fill at t = 0).  [B, T, ...] -> [B, T, ...]"""
    pad = jnp.full_like(a[:, :1], fill)
    return jnp.concatenate([pad, a[:, :-1]], axis=1)


def candidates(h, prev_h, can_fuse, prev_can_fuse, threshold: float):
    """Token t may absorb t-1: both may fuse here and their states are near-duplicates.  -> [B, T] bool"""
    return can_fuse & prev_can_fuse & (cosine(prev_h, h) > threshold)


def can_absorb(absorbable, absorbed, layer, min_layer: int):
    """Tokens that may absorb their predecessor after `layer`: absorbable there themselves, not grown
    by an earlier absorption (each absorbs at most once), at l_min or above.  [B, T] -> [B, T] bool"""
    return absorbable & ~absorbed & (layer >= min_layer)


def fuses(cand, prev_cand):
    """t absorbs t-1: t is a candidate and t-1 is not itself a candidate to absorb t-2 at this layer.
    [B, T] -> [B, T] bool"""
    return cand & ~prev_cand


def decide(h, size, can_absorb, prev_h, prev_size, prev_can_be_absorbed, threshold: float):
    """The pairing rule for token t and its predecessor t-1 (over a window, or one decoded token
    against the previous token's view): whether t is a candidate to absorb t-1, and the merged state
    and size if it does.  -> candidates [B, T] bool, merged h [B, T, D], size [B, T].
    Which candidates fuse: `fuses`."""
    cand = candidates(h, prev_h, can_absorb, prev_can_be_absorbed, threshold)
    merged, merged_size = merge(h, prev_h, size, prev_size)
    return cand, merged, merged_size


def merge(h, prev_h, size, prev_size):
    """Size-weighted mean state and summed size of the pair (t-1, t).  -> h [B, T, D], size [B, T]"""
    s = size + prev_size
    merged = (prev_size[..., None] * prev_h.astype(jnp.float32) + size[..., None] * h.astype(jnp.float32)) / s[..., None]
    return merged.astype(h.dtype), s
