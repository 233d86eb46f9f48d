"""When drafting pays: the draft length is fixed (one compiled verify pass of K + 1 tokens), and each
step either verifies its drafts or runs a plain step, by the acceptance seen so far.

A verify pass costs c plain steps (its K + 1 tokens through the weights at once) and drafting with the
model's own layers K f more (f: the share of sublayers the drafter runs; 0 for prompt lookup). It
pays when the drafts it gets accepted, a, bring more tokens than that time would: a + 1 > c + K f.
With the running estimate

    E_t = (1 - w) E_(t-1) + w a_t            (a_t: accepted drafts per row of the t-th verify, w = 1/2)

a step verifies when it has drafts and E >= break_even + K f  (break_even = c - 1, measured), and
otherwise once `patience` chances have passed (a probe), so that a text that turns repetitive is
noticed. The first drafts are always tried, and E is then their acceptance (not an average with a
guess: one failed pass pauses drafting). A probe that gets no draft accepted doubles the patience
(PROBE, 2 PROBE, ... up to PROBE_MAX chances); one that does resets it to PROBE. With no drafts at all
(prompt lookup found no match) every step is plain: on open-ended text speculation costs the lookup,
the first pass and the probes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

PROBE = 8  # chances passed before drafts are tried again though they did not pay
PROBE_MAX = 64  # the longest wait, after probes that failed in a row
WEIGHT = 0.5
UNTRIED = -1.0  # E before the first verify pass


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pace:
    expected: jax.Array  # [] float32, E (UNTRIED before the first pass)
    waited: jax.Array  # [] int32, chances passed since the last verify
    patience: jax.Array  # [] int32, chances to pass before a probe

    @classmethod
    def start(cls, num_tokens: int) -> Pace:
        return cls(jnp.float32(UNTRIED), jnp.int32(0), jnp.int32(PROBE))

    def verifies(self, chance, threshold: float):
        """Whether to verify, at a chance (some row has drafts).  -> [] bool"""
        return chance & ((self.expected == UNTRIED) | (self.expected >= threshold) | (self.waited >= self.patience))

    def after(self, chance, verified, accepted) -> Pace:
        """The pace after a step: accepted [] float32 (mean accepted drafts per drafting row)."""
        mixed = jnp.where(self.expected == UNTRIED, accepted, (1 - WEIGHT) * self.expected + WEIGHT * accepted)
        expected = jnp.where(verified, mixed, self.expected)
        probe = verified & (self.waited >= self.patience)
        patience = jnp.where(probe, jnp.where(accepted > 0, PROBE, jnp.minimum(2 * self.patience, PROBE_MAX)),
                             self.patience)
        waited = jnp.where(verified, 0, self.waited + chance.astype(jnp.int32))
        return Pace(expected, waited, patience)
