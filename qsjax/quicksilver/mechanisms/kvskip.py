"""KV Cache Skipping: what a halted token leaves for others to attend to in the layers it skips.

For a token halted after layer l, in a layer l' > l:
- mask: its key/value is not written; nobody attends to it there (score -inf, not a zero key);
- zero: the paper's literal k, v <- 0; a zero key still takes softmax mass (exp(0) = 1 against the
  other scores), which is why it is implemented: to measure it;
- propagate (CALM-style): k, v computed from its frozen state h^l with layer l''s own K/V
  projections; optionally only for `span` layers above the halt, masked beyond.
Tokens retired by fusion are masked above their fusion layer in every mode.
"""

from __future__ import annotations

import jax.numpy as jnp


def visible_keys(mode: str, layer, computing, halted, halt_layer, valid, span: int | None):
    """Which tokens' keys/values can be attended to at `layer` (1-based).  [B, T] masks -> [B, T] bool

    computing: the token runs this layer; halted: it halted earlier (not retired); halt_layer: the layer
    after which it halted."""
    if mode == "mask":
        kept = jnp.zeros_like(halted)
    elif mode == "zero":
        kept = halted
    else:  # propagate
        kept = halted if span is None else halted & (layer - halt_layer <= span)
    return valid & (computing | kept)


def zero_halted(k, v, halted, mode: str):
    """In `zero` mode, halted tokens' keys and values are zero vectors.  k, v [B, T, K, Dh]"""
    if mode != "zero":
        return k, v
    keep = ~halted[:, :, None, None]
    return jnp.where(keep, k, 0), jnp.where(keep, v, 0)


def writes_kv(mode: str, computing, halted, halt_layer, layer, span: int | None):
    """Tokens whose key/value is written (computed) at `layer`: those computing it, plus halted ones
    whose K/V are propagated (their projections are extra work to count)."""
    if mode != "propagate":
        return computing
    kept = halted if span is None else halted & (layer - halt_layer <= span)
    return computing | kept
