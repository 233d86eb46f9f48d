"""Helpers for the QuickSilver tests: run the masked reference forward on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np

from qsjax.dense.blocks import lm_logits
from qsjax.dense.model import Layout
from qsjax.quicksilver.decoding.steps import prepare
from qsjax.quicksilver.window.forward import quicksilver_window


_CACHE = {}


def _compiled(qs, model):
    key = (id(model), qs)
    if key in _CACHE:
        return _CACHE[key]
    prepared = prepare(model, qs)

    def run(state, tokens, eligible, needed):
        module = prepared.module(state)
        B, T = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        w = Layout.of(module.cfg, positions, jnp.ones((B, T), bool))
        out = quicksilver_window(qs, module, tokens, w, eligible, needed)
        return lm_logits(module, out.x), out.tokens, out.layers.stats, out.layers.cache

    _CACHE[key] = prepared, jax.jit(run)
    return _CACHE[key]


def run_window(model, qs, tokens, eligible=None, needed=None):
    """-> logits [B, T, V] (numpy), Tokens, LayerStats [L, B], CacheEntries [L, ...].  By default every token is
    eligible and every token's logits are needed (a scope=all window read in full)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    eligible = jnp.ones(tokens.shape, bool) if eligible is None else jnp.asarray(eligible)
    needed = jnp.ones(tokens.shape, bool) if needed is None else jnp.asarray(needed)
    prepared, fn = _compiled(qs, model)
    logits, tok, stats, cache = fn(prepared.state, tokens, eligible, needed)
    return np.asarray(logits), tok, stats, cache


def executed_fraction(stats, n_tokens: int) -> float:
    computing = np.asarray(stats.computing)
    return computing.sum() / (n_tokens * computing.shape[0])
