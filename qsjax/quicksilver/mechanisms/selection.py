"""Importance selection: which context tokens keep computing after a selection layer.

After layer c (and, in a pyramid, again after c2 > c), only a budget of the E eligible tokens of
a row keeps computing; the other candidates (eligible tokens still computing) halt:

    n_keep = min(E, max(1, m, ceil(k E)))  k = keep_top_k at c, keep_top_k2 at c2 (of the same E),
                                           m = select_min_keep (a floor: a prompt of at most m
                                           eligible tokens loses none)

filled in this order:
1. the r most recent candidates (a recent window, as StreamingLLM keeps next to its sinks; the
   first n_sink tokens are never candidates):  r = min(n_keep, select_recent) for a count, or
   r = ceil(select_recent x n_keep) for a share (select_recent < 1), so that the window and the
   voted keys split every prompt's budget alike, whatever its length;
2. the rest by score s_j, highest first (ties: the earlier token):
   - recency: s_j = position j;
   - attention received from the voters V, the last `select_queries` eligible tokens still
     computing (FastKV / GemFilter's observation window), each voter's softmax over the keys it
     sees at layer l, per KV head kappa (its G query heads summed), under the layer's rule (a
     soft-capped score, a sliding window: a key outside a voter's window gets nothing from it):

         a_{kappa,j}^l = sum_{i in V} sum_g softmax_j(q_{kappa g,i} . k_{kappa,j} / sqrt(Dh))
         s_j^l = sum_kappa a_{kappa,j}^l  (select_heads="sum")
               = max_kappa a_{kappa,j}^l  ("max": a key one KV head relies on survives
                                            although the other heads ignore it)

     s_j = s_j^c; with `select_accumulate` (H2O's heavy hitters) s_j = sum_{l <= c} s_j^l (at c2:
     up to c2); a row with fewer than `select_queries` such tokens has them all vote;
   - then, with `select_pool` = w > 1 (SnapKV), s_j <- max (or mean) of s_i over |i - j| <= w // 2,
     over candidates i only (sinks, padding and scored tokens neither give nor take), so a
     selected key brings its neighbours.

Only the voters' rows are scored: [B, K, G, n_q, T] per scoring layer, never T x T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qsjax.dense.attention import PLAIN, Rule
from qsjax.dense.layers import grouped_scores, softcap


def last_n(mask, n):
    """The last n True entries of each row (n: an int, or [B, 1]).  [B, T] bool -> [B, T] bool"""
    from_end = jnp.cumsum(mask[:, ::-1], axis=-1)[:, ::-1]
    return mask & (from_end <= n)


def voters(eligible, computing, n: int):
    """The last n eligible computing tokens of each row: their slots idx [B, n] (ascending; unused
    places point at slot 0) and which places are used ok [B, n]."""
    mask = last_n(eligible & computing, n)
    idx = jax.vmap(lambda m: jnp.nonzero(m, size=n, fill_value=0)[0])(mask)
    return idx.astype(jnp.int32), jnp.arange(n)[None, :] < mask.sum(-1, keepdims=True)


def received(q, k, q_slot, k_slot, q_ok, visible, heads: str, rule: Rule = PLAIN):
    """Attention each key receives from the voters, reduced over KV heads (`heads`: sum or max),
    under the layer's rule as its attention applies it: scores soft-capped before the softmax, and a
    key outside a voter's sliding window neither seen nor scored by it.

    q [B, n, H, Dh] (the voters' queries), k [B, T, K, Dh], q_slot [B, n], k_slot [B, T],
    q_ok [B, n] (used places), visible [B, T] (keys that may be attended)  ->  [B, T] float32"""
    scores = grouped_scores(q, k)  # [B, K, G, n, T]
    if rule.softcap is not None:
        scores = softcap(scores, rule.softcap)
    qs, ks = q_slot[:, :, None], k_slot[:, None, :]
    mask = (ks <= qs) & visible[:, None, :]  # [B, n, T]
    if rule.sliding is not None:
        mask = mask & (ks > qs - rule.sliding)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    per_head = jnp.einsum("bkgns,bn->bks", probs, q_ok.astype(jnp.float32))  # [B, K, T]
    return per_head.sum(1) if heads == "sum" else per_head.max(1)


def pool(score, candidates, width: int, kind: str):
    """Max or mean of the candidates' scores over a window of `width` positions centred on each
    position (width <= 1: unchanged). Non-candidates neither give nor take.  [B, T] -> [B, T]"""
    if width <= 1:
        return score
    window, pad = (1, width), ((0, 0), (width // 2, width // 2))
    if kind == "max":
        masked = jnp.where(candidates, score, -jnp.inf)
        return jax.lax.reduce_window(masked, -jnp.inf, jax.lax.max, window, (1, 1), pad)
    total = jax.lax.reduce_window(jnp.where(candidates, score, 0.0), 0.0, jax.lax.add, window, (1, 1), pad)
    count = jax.lax.reduce_window(candidates.astype(jnp.float32), 0.0, jax.lax.add, window, (1, 1), pad)
    return total / jnp.maximum(count, 1.0)


def rank_within(score, candidates):
    """Rank of each candidate's score among the candidates of its row, 0 = highest.  [B, T] -> [B, T]"""
    s = jnp.where(candidates, score, -jnp.inf)
    order = jnp.argsort(-s, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def budget(eligible, fraction, floor: int = 0):
    """n_keep = min(E, max(1, floor, ceil(fraction x E))) per row, E its eligible tokens.  [B, T] -> [B] int32"""
    E = eligible.sum(-1)
    return jnp.minimum(E, jnp.maximum(jnp.ceil(fraction * E), max(floor, 1))).astype(jnp.int32)


def keep(score, candidates, n_keep, recent: float = 0):
    """The n_keep [B] candidates that keep computing: the most recent first (`recent` of them, at
    most n_keep, or below 1 that share of n_keep, rounded up), then the highest scores (ties: the
    earlier token).  -> [B, T] bool"""
    n_recent = jnp.ceil(recent * n_keep) if recent < 1 else jnp.minimum(recent, n_keep)
    window = last_n(candidates, n_recent[:, None])
    ranked = rank_within(jnp.where(window, jnp.inf, score), candidates)
    return candidates & (ranked < n_keep[:, None])
