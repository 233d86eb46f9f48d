"""Perplexity scoring with QuickSilver: which tokens are in scope in a window, and the NLL.

In a window whose positions offset..T-2 predict the scored tokens, `scope=context` lets the
mechanisms touch only positions 0..offset-1 (their own predictions are not needed); `scope=all`
lets them touch every position (the paper: a halted token's prediction comes from its frozen state).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qsjax.dense import blocks
from qsjax.dense.model import Layout
from qsjax.evaluation.perplexity import nll_of
from qsjax.quicksilver.settings import QuickSilverConfig
from qsjax.quicksilver.window.state import LayerStats
from qsjax.quicksilver.window.forward import quicksilver_window


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scored:
    """A batch of windows scored under QuickSilver: nll [B, T-1-offset], per-layer stats [L, B], AMQ
    entropy checks [B], and the decisions [B, T] (halt layer, fused, width, eligible)."""

    nll: jax.Array
    stats: LayerStats
    amq_checks: jax.Array
    halt: jax.Array
    fused: jax.Array
    bits: jax.Array
    eligible: jax.Array


def in_scope(qs: QuickSilverConfig, B: int, T: int, offset: int):
    """[B, T] bool: positions the scope lets the mechanisms touch."""
    if qs.scope == "all":
        return jnp.ones((B, T), bool)
    return jnp.broadcast_to(jnp.arange(T) < offset, (B, T))


def quicksilver_nll(qs: QuickSilverConfig, module, tokens, lengths, offset: int) -> Scored:
    """NLL of tokens offset+1..T-1 of each row (LM head on those positions only) under QuickSilver.
    tokens [B, T], lengths [B] real tokens per row (right padding)."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    w = Layout.of(module.cfg, positions, positions < lengths[:, None])
    out = quicksilver_window(qs, module, tokens, w, in_scope(qs, B, T, offset), positions >= offset)
    nll = nll_of(blocks.lm_logits(module, out.x[:, offset:-1]), tokens[:, offset + 1:])
    t = out.tokens
    return Scored(nll, out.layers.stats, out.amq_checks, t.halt, t.fused, t.bits, out.eligible)
