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
  do) or by recency; the others halt (the signals and the keep rule: `selection`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
