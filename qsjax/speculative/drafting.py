"""Drafting with the model's own layers (self-speculation, training-free: Draft & Verify, Zhang et
al. 2024; SWIFT, Xia et al. 2025): the same weights with a set of sublayers left out propose K tokens
greedily, one pass each, through the same cache:

    d_(j+1) = argmax  f_skip(x_0, d_1, ..., d_j)          j = 0..K-1

A skipped sublayer leaves the residual stream as it is (`dense.model.Sublayers`); the layers that run
write their keys and values at the drafts' places, which the verify pass then overwrites with the
full model's (an evicting cache, whose drafting passes evicted, is verified on as it was before
them: `loop.after_drafting`). An early exit (LayerSkip's drafter; transformers' `assistant_early_exit`) is the set
"every sublayer above layer E". Which set drafts best is measured on shipped text (`search.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qsjax.dense.model import Sublayers


def self_drafts(run, module, cache, token, lead, K: int, skip: Sublayers):
    """K greedy drafts per row from the model without `skip`'s sublayers.  token [B] (the row's last,
    not yet cached), lead [B]; run(module, cache, tokens [B, T], lead, skip) -> (logits [B, T, V], cache)
    -> drafts [B, K] int32, the cache (the drafter's entries at the drafts' places)."""

    def one(carry, j):
        tok, cache = carry
        logits, cache = run(module, cache, tok[:, None], lead + j, skip)
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return (nxt, cache), nxt

    (_, cache), drafts = jax.lax.scan(one, (token, cache), jnp.arange(K, dtype=jnp.int32))
    return drafts.T, cache


def weights_read(skip: Sublayers, cfg) -> float:
    """The share of a plain step's weights a draft step reads (f): the layers' that run, and the LM
    head, which every draft reads whole."""
    layers = cfg.n_layers * layer_weights(cfg)
    head = cfg.vocab_size * cfg.d_model
    return (share_run(skip, cfg) * layers + head) / (layers + head)


def layer_weights(cfg) -> int:
    """A layer's parameters: its attention projections and its MLP."""
    return cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + mlp_weights(cfg)


def mlp_weights(cfg) -> int:
    return cfg.d_model * cfg.d_ff * (2 if cfg.arch == "gpt2" else 3)


def share_run(skip: Sublayers, cfg) -> float:
    """The share of the layers' weights a drafter with this skip set runs: each attention sublayer
    weighs its projections' parameters, each MLP its own (`weights_read` adds the LM head)."""
    mlp = mlp_weights(cfg)
    attention = layer_weights(cfg) - mlp
    total = cfg.n_layers * (attention + mlp)
    return 1.0 - (len(skip.attention) * attention + len(skip.mlp) * mlp) / total
