"""Perplexity scoring with QuickSilver: which tokens are eligible in a window, and the NLL.

In a window whose positions offset..T-2 predict the scored tokens, `scope=context` lets the
mechanisms touch only positions 0..offset-1 (their own predictions are not needed); `scope=all`
lets them touch every position (the paper: a halted token's prediction comes from its frozen state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qsjax.quicksilver.config import QuickSilverConfig
from qsjax.quicksilver.forward import quicksilver_window


def eligible_positions(qs: QuickSilverConfig, B: int, T: int, offset: int):
    """[B, T] bool: positions the mechanisms may touch (sinks are removed by the forward pass)."""
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    if qs.scope == "all":
        return jnp.ones((B, T), bool)
    return positions < offset


def quicksilver_nll(qs: QuickSilverConfig, module, tokens, lengths, offset: int):
    """NLL of tokens offset+1..T-1 of each row (LM head on those positions only) under QuickSilver.

    tokens [B, T], lengths [B] real tokens per row -> nll [B, T-1-offset], per-layer stats,
    AMQ entropy checks [B], decisions (halt layer, fused, bits; [B, T] each)."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    valid = positions < lengths[:, None]  # right padding only
    needed = positions >= offset  # the positions whose predictions are scored
    x, tok, stats, _, amq_checks, _ = quicksilver_window(qs, module, tokens, positions, valid,
                                                         eligible_positions(qs, B, T, offset), needed)
    z = module.logits(x[:, offset:-1])  # [B, n, V]
    target = tokens[:, offset + 1:]
    nll = jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, target[..., None], axis=-1)[..., 0]
    return nll, stats, amq_checks, (tok.halt, tok.fused, tok.bits, valid & eligible_positions(qs, B, T, offset))
