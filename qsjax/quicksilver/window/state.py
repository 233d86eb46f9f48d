"""The named state a QuickSilver pass carries: per-token decisions, the window's context, what each
layer executed and leaves in the cache, and the pass's result.

Layer numbering: layers are 1..L as in the paper ("after layer l" = once block l has run, block l
being `module.blocks[l - 1]`); a token that never halted has `halt == L`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qsjax.dense.attention import Window
from qsjax.dense.model import Layout


def _pytree(cls):
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@_pytree
class Tokens:
    """Per-token state and decisions, [B, T] each (x is [B, T, D])."""

    x: jax.Array
    active: jax.Array  # bool: runs the next layer
    alive: jax.Array  # bool: not retired by fusion
    halt: jax.Array  # int32: the layer after which it stopped; L when it never did
    fused: jax.Array  # bool: retired by fusion (at layer `halt`)
    absorbed: jax.Array  # bool: has absorbed its predecessor
    size: jax.Array  # float32: tokens its state stands for
    bits: jax.Array  # int32: Matryoshka weight width from layer l_q up
    score: jax.Array  # float32: attention received from importance selection's voters (summed over layers)

    @classmethod
    def start(cls, x, valid, n_layers: int) -> Tokens:
        """Every real token computing, alone, at full width.  x [B, T, D], valid [B, T]"""
        B, T = valid.shape
        no = jnp.zeros((B, T), bool)
        return cls(x=x, active=valid, alive=valid, halt=jnp.full((B, T), n_layers, jnp.int32), fused=no, absorbed=no,
                   size=jnp.ones((B, T), jnp.float32), bits=jnp.full((B, T), 8, jnp.int32),
                   score=jnp.zeros((B, T), jnp.float32))

    @property
    def halted(self):
        """Tokens that stopped computing at an earlier layer and were not retired (their state frozen).  [B, T]"""
        return self.alive & ~self.active


@_pytree
class Context:
    """What every layer of a QuickSilver pass needs besides the tokens' state: where the tokens sit
    (`model.Layout`), and, [B, T] each, which tokens the mechanisms may touch (`eligible`: real,
    past the sinks, in scope) and whose own logits will be read (`needed`: see `layer` on fusion);
    `local`: the far context's attention window (`quicksilver.local`), None when it is off."""

    layout: Layout
    eligible: jax.Array
    needed: jax.Array
    local: Window | None = None


@_pytree
class FusionView:
    """What a token's successor needs to decide fusion with it at one layer, [B] each (x [B, D]):
    its state after the layer (before fusion), its size then, whether it could be absorbed there,
    and whether it was itself a candidate to absorb its own predecessor there."""

    x: jax.Array
    size: jax.Array
    absorbable: jax.Array
    candidate: jax.Array


@_pytree
class LayerStats:
    """What one layer executed, per row [B] (int32)."""

    computing: jax.Array  # tokens that ran the layer
    pairs: jax.Array  # (query, key) pairs attended by those tokens
    entropy_checks: jax.Array  # LM-head projections for the halting entropy test
    propagated: jax.Array  # halted tokens whose K/V were projected (propagate mode)
    kv_skipped: jax.Array  # real tokens whose K/V were not written
    selection_pairs: jax.Array  # (query, key) scores of importance selection
    selection_queries: jax.Array  # voters whose q, k, v were projected for those scores


@_pytree
class CacheEntries:
    """What one layer leaves for later tokens to attend to, [B, T] (k and v [B, T, K, Dh])."""

    k: jax.Array
    v: jax.Array
    visible: jax.Array  # bool: may be attended to
    bias: jax.Array  # float32: log of the fused group's size, added to its score


@_pytree
class LayerOut:
    """A layer's by-products, stacked over layers by the scan ([L, ...] each)."""

    stats: LayerStats
    cache: CacheEntries
    view: FusionView  # the last position's (what a next token decoded after the window needs)


@_pytree
class WindowResult:
    """A QuickSilver pass over windows.  x [B, T, D]: final states (a halted token's frozen one);
    tokens: the decisions; layers: LayerOut stacked [L, ...]; amq_checks [B]: entropy LM-head
    projections for the Matryoshka widths; eligible [B, T]: the tokens the mechanisms could touch."""

    x: jax.Array
    tokens: Tokens
    layers: LayerOut
    amq_checks: jax.Array
    eligible: jax.Array
