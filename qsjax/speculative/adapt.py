"""When drafting pays: the draft length is fixed (one compiled verify pass of K + 1 tokens), and each
step either verifies its drafts or runs a plain step, by the acceptance seen so far.

A verify pass costs c plain steps (its K + 1 tokens through the weights at once) and drafting with the
model's own layers K f more (f: the share of the weights a draft step reads; 0 for prompt lookup). It
pays when the drafts it gets accepted, a, bring more tokens than that time would: a + 1 > c + K f.
With the running estimate

    E_t = (1 - w) E_(t-1) + w a_t            (a_t: accepted drafts per row, w = 1/2)

a step verifies when it has drafts and E >= threshold = break_even + K f  (break_even = c - 1).

Where a_t comes from differs by drafter:
  - prompt lookup costs nothing to draft, so a plain step also tells what its drafts would have got:
    the drafts a row had before the step are followed through the plain steps after it (`Shadow`),
    each token compared with the next draft, and a run that misses (or matches all) gives
    a = the drafts matched, at no cost. Under greedy decoding that is exactly what a verify pass
    would have accepted; under sampling it is accepted with the same probability p(d). Runs still
    being followed count at what they matched so far: once that alone would lift E to the
    threshold, verifying starts. So prompt lookup verifies only on evidence: on open-ended text it
    costs the lookup and the passes after runs of drafts that came true by chance.
  - a model drafter (its own layers) must run to be judged: its first drafts are always tried (E is
    then their acceptance), and while E is below the threshold a pass is tried again after
    `patience` chances (a probe): PROBE, doubled after each probe that gets nothing accepted, up to
    PROBE_MAX; one that does resets it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

PROBE = 8  # chances passed before a model drafter's drafts are tried again though they did not pay
PROBE_MAX = 64  # the longest wait, after probes that failed in a row
WEIGHT = 0.5
UNTRIED = -1.0  # a model drafter's E before its first pass


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Shadow:
    """Prompt lookup's drafts followed through plain steps, per row: drafts [B, K], n [B] (drafts in
    the run; 0: none followed), matched [B] (how many of them the plain steps since have produced)."""

    drafts: jax.Array
    n: jax.Array
    matched: jax.Array

    @classmethod
    def empty(cls, B: int, K: int) -> Shadow:
        zeros = jnp.zeros(B, jnp.int32)
        return cls(jnp.zeros((B, K), jnp.int32), zeros, zeros)

    def step(self, drafts, n, token, live):
        """After a plain step that emitted `token` [B]: a row with no run follows `drafts` [B, K]
        (`n` [B] of them, those it had before the step). -> the shadow after, ended [B] bool (the
        row's run missed or matched all its drafts), a [B] int32 (the drafts it matched)."""
        follows = self.n > 0
        run = Shadow(jnp.where(follows[:, None], self.drafts, drafts), jnp.where(follows, self.n, n),
                     jnp.where(follows, self.matched, 0))
        want = jnp.take_along_axis(run.drafts, jnp.minimum(run.matched, run.drafts.shape[1] - 1)[:, None], 1)[:, 0]
        hit = live & (run.matched < run.n) & (token == want)
        matched = run.matched + hit
        ended = live & (run.n > 0) & (~hit | (matched == run.n))
        return Shadow(run.drafts, jnp.where(ended | ~live, 0, run.n), jnp.where(ended, 0, matched)), ended, matched


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pace:
    expected: jax.Array  # [] float32, E (UNTRIED before a model drafter's first pass)
    waited: jax.Array  # [] int32, chances passed since the last verify
    patience: jax.Array  # [] int32, chances to pass before a probe (model drafters)
    shadow: Shadow  # prompt lookup's drafts followed through plain steps
    threshold: float = dataclasses.field(metadata=dict(static=True))  # accepted drafts at which verifying pays
    lookup: bool = dataclasses.field(metadata=dict(static=True))  # prompt lookup (else a model drafter)

    @classmethod
    def start(cls, B: int, K: int, threshold: float, lookup: bool) -> Pace:
        return cls(jnp.float32(0.0 if lookup else UNTRIED), jnp.int32(0), jnp.int32(PROBE), Shadow.empty(B, K),
                   threshold, lookup)

    def mixed(self, a):
        """E after one more observation a (the first, for a model drafter's first pass)."""
        return jnp.where(self.expected == UNTRIED, a, (1 - WEIGHT) * self.expected + WEIGHT * a)

    def verifies(self, n):
        """Whether to verify, with n [B] drafts per row (a chance: some row has drafts).  -> [] bool"""
        chance, threshold = jnp.any(n > 0), self.threshold
        if self.lookup:  # or E would reach the threshold with the runs followed now ending at what they matched
            following = self.shadow.n > 0
            matched = jnp.sum(jnp.where(following, self.shadow.matched, 0)) / jnp.maximum(1, following.sum())
            return chance & ((self.expected >= threshold) | (following.any() & (self.mixed(matched) >= threshold)))
        return chance & ((self.expected == UNTRIED) | (self.expected >= threshold) | (self.waited >= self.patience))

    def after(self, verified, accepted, drafts, n, token, live) -> Pace:
        """The pace after a step: accepted [] float32 (mean accepted drafts per drafting row, if it
        verified); drafts [B, K], n [B] the drafts the rows had, token [B] the plain step's token,
        live [B] the rows generating (prompt lookup's shadow)."""
        expected = jnp.where(verified, self.mixed(accepted), self.expected)
        shadow = Shadow.empty(*drafts.shape)
        if self.lookup:
            followed, ended, a = self.shadow.step(drafts, n, token, live)
            mean = jnp.sum(jnp.where(ended, a, 0)) / jnp.maximum(1, ended.sum())
            expected = jnp.where(~verified & ended.any(), self.mixed(mean.astype(jnp.float32)), expected)
            shadow = jax.tree.map(lambda v, e: jnp.where(verified, e, v), followed, shadow)
        probe = verified & (self.waited >= self.patience)
        patience = jnp.where(probe, jnp.where(accepted > 0, PROBE, jnp.minimum(2 * self.patience, PROBE_MAX)),
                             self.patience)
        waited = jnp.where(verified, 0, self.waited + jnp.any(n > 0).astype(jnp.int32))
        return dataclasses.replace(self, expected=expected, waited=waited, patience=patience, shadow=shadow)
