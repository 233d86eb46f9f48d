"""When drafting pays: the draft length is fixed (one compiled verify pass of K + 1 tokens), and each
step either verifies its drafts or runs a plain step, by the acceptance seen so far.

A verify pass costs c plain steps (its K + 1 tokens through the weights at once) and drafting with the
model's own layers K f more (f: the share of sublayers the drafter runs; 0 for prompt lookup). It
pays when the drafts it gets accepted, a, bring more tokens than that time would: a + 1 > c + K f.
With the running estimate

    E_t = (1 - w) E_(t-1) + w a_t            (a_t: accepted drafts per row of the t-th verify, w = 1/2)

a step verifies when it has drafts and E >= break_even + K f  (break_even = c - 1, measured), and at
least every PROBE-th chance otherwise, so that a text that turns repetitive is noticed. E starts at
K: the first drafts are always tried. With no drafts at all (prompt lookup found no match) every
step is plain: on open-ended text speculation costs the lookup and nothing more.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

PROBE = 8  # chances passed before drafts are tried again though they did not pay
WEIGHT = 0.5


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pace:
    expected: jax.Array  # [] float32, E
    waited: jax.Array  # [] int32, chances passed since the last verify

    @classmethod
    def start(cls, num_tokens: int) -> Pace:
        return cls(jnp.float32(num_tokens), jnp.int32(0))

    def verifies(self, chance, threshold: float):
        """Whether to verify, at a chance (some row has drafts).  -> [] bool"""
        return chance & ((self.expected >= threshold) | (self.waited >= PROBE))

    def after(self, chance, verified, accepted) -> Pace:
        """The pace after a step: accepted [] float32 (mean accepted drafts per drafting row)."""
        expected = jnp.where(verified, (1 - WEIGHT) * self.expected + WEIGHT * accepted, self.expected)
        waited = jnp.where(verified, 0, self.waited + chance.astype(jnp.int32))
        return Pace(expected, waited)
