"""Dynamic Token Halting: which tokens stop being computed after layer l.

QuickSilver's rule (paper): after layer l >= l_min, token t halts when its state has stopped moving
and its next-token distribution is already confident,

    d_t^l = ||h_t^l - h_t^(l-1)|| / ||h_t^(l-1)||  <  tau_drift        (relative drift; raw L2 optional)
    H_t^l = - sum_v p_v log2 p_v  <  tau_H,   p = softmax(LMhead(norm(h_t^l)))

The entropy needs an LM-head projection, so it is computed only for tokens that passed the drift test.
A halted token's state is frozen: h_t^(l') = h_t^l for every l' > l.

Two policies beyond the paper, in the same framework:
- depth cut-off: every eligible token halts after layer c;
- importance selection: after layer c, only the top-k fraction of eligible tokens keeps computing,
  ranked by the attention they receive from the most recent eligible queries (as FastKV / GemFilter
  do) or by recency; the others halt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qsjax.layers import grouped_scores


def drift(h_new, h_old, relative: bool = True):
    """d = ||h_new - h_old|| (/ ||h_old||).  [..., D] -> [...] float32"""
    diff = jnp.linalg.norm((h_new - h_old).astype(jnp.float32), axis=-1)
    if not relative:
        return diff
    return diff / jnp.maximum(jnp.linalg.norm(h_old.astype(jnp.float32), axis=-1), 1e-12)


def entropy_bits(logits):
    """Shannon entropy of softmax(logits) in bits.  [..., V] -> [...]"""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1) / jnp.log(2.0)


def rank_within(score, candidates):
    """Rank of each candidate's score among the candidates of its row, 0 = highest.  [B, T] -> [B, T]"""
    s = jnp.where(candidates, score, -jnp.inf)
    order = jnp.argsort(-s, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def select_keep(score, candidates, keep_fraction: float):
    """The top `keep_fraction` of each row's candidates by score (at least one).  -> [B, T] bool"""
    n_keep = jnp.maximum(jnp.ceil(keep_fraction * candidates.sum(-1)), 1).astype(jnp.int32)  # [B]
    return candidates & (rank_within(score, candidates) < n_keep[:, None])


def attention_received(q, k, queries, keys_visible):
    """How much attention each key receives from a few query positions, summed over heads.

    q [B, T, H, Dh], k [B, T, K, Dh], queries [B, T] bool (the voting queries),
    keys_visible [B, T] bool  ->  [B, T] float32.  Computed for all T queries and masked (reference)."""
    T = q.shape[1]
    scores = grouped_scores(q, k)  # [B, K, G, T, S]
    slots = jnp.arange(T)
    mask = (slots[None, :] <= slots[:, None])[None] & keys_visible[:, None, :]  # [B, T, S]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, T, S]
    return jnp.einsum("bkgts,bt->bs", probs, queries.astype(jnp.float32))


def last_n(mask, n: int):
    """The last n True entries of each row.  [B, T] bool -> [B, T] bool"""
    from_end = jnp.cumsum(mask[:, ::-1], axis=-1)[:, ::-1]
    return mask & (from_end <= n)
