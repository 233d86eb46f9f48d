"""Which drafted tokens the model accepts: the verification rule of speculative decoding.

A verify pass runs the row's last token x_0 and its drafts d_1..d_n through the model at once; its
logits at position j give the model's distribution p_j of the token after x_0, d_1, ..., d_j.

Greedy (Leviathan et al. 2023; Chen et al. 2023, with T -> 0):

    g_j = argmax p_j,     a = max { i <= n : d_1 = g_0, ..., d_i = g_(i-1) },     emit g_0, ..., g_a

i.e. the drafts the model would have produced itself, then the model's own token where they part (or
after the last draft): exactly plain greedy decoding, a + 1 tokens for one pass.

Sampling, with a deterministic drafter (q_j puts all its mass on d_j): d_(j+1) is accepted with
probability min(1, p_j(d) / q_j(d)) = p_j(d_(j+1)); at the first rejection the token is drawn from the
residual norm(max(0, p_a - q_a)), i.e. p_a without d_(a+1), renormalised; after n acceptances from p_n.
Every emitted token then follows the model's own distribution p (the standard speculative sampling
theorem), with p the distribution plain sampling draws from (temperature, top-k, top-p applied).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qsjax.dense.sampler import Sampling, filtered_logits


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Verdict:
    """accepted [B]: drafts accepted (a); tokens [B, n + 1]: the emitted tokens in their first a + 1
    places (the accepted drafts, then the model's own)."""

    accepted: jax.Array
    tokens: jax.Array


def leading(ok):
    """The length of each row's leading run of True.  ok [B, n] bool -> [B] int32"""
    return jnp.cumprod(ok.astype(jnp.int32), axis=-1).sum(-1).astype(jnp.int32)


def verdict(logits, drafts, n_drafts, rng, sampling: Sampling, temperature, top_p) -> Verdict:
    """logits [B, n + 1, V] of the verify pass; drafts [B, n] int32, of which each row's first
    n_drafts[b] are real -> the Verdict."""
    n = drafts.shape[1]
    real = jnp.arange(n)[None, :] < n_drafts[:, None]  # [B, n]
    if not sampling.do_sample:
        g = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, n + 1]
        return Verdict(leading(real & (drafts == g[:, :n])), g)
    logp = jax.nn.log_softmax(filtered_logits(logits, sampling, temperature, top_p), axis=-1)  # [B, n + 1, V]
    u_key, pick_key = jax.random.split(rng)
    p_draft = jnp.exp(jnp.take_along_axis(logp[:, :n], drafts[..., None], axis=-1)[..., 0])  # p_j(d_(j+1)) [B, n]
    a = leading(real & (jax.random.uniform(u_key, p_draft.shape) < p_draft))
    at = lambda x: jnp.take_along_axis(x, a[:, None, None], axis=1)[:, 0]  # position a of [B, n + 1, ...]
    rejected = at(jnp.pad(drafts, ((0, 0), (0, 1)))[..., None])[:, 0]  # d_(a+1), or anything when a = n
    residual = at(logp)  # [B, V]
    drop = (a < n_drafts)[:, None] & (jnp.arange(residual.shape[-1])[None, :] == rejected[:, None])
    last = jax.random.categorical(pick_key, jnp.where(drop, -jnp.inf, residual), axis=-1).astype(jnp.int32)
    emitted = jnp.concatenate([drafts, drafts[:, :1]], axis=1)
    emitted = jnp.where(jnp.arange(n + 1)[None, :] == a[:, None], last[:, None], emitted)
    return Verdict(a, emitted)
