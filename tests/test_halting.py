"""Dynamic Token Halting's building blocks: drift and entropy (selection: tests/test_selection.py)."""

import jax.numpy as jnp

from qsjax.quicksilver.mechanisms import halting


def test_drift_relative_and_raw():
    old = jnp.array([[3.0, 4.0]])
    new = jnp.array([[3.0, 4.5]])
    assert float(halting.drift(new, old, relative=False)[0]) == 0.5
    assert abs(float(halting.drift(new, old)[0]) - 0.1) < 1e-6


def test_entropy_bits():
    assert abs(float(halting.entropy_bits(jnp.zeros(8))) - 3.0) < 1e-5  # uniform over 8: 3 bits
    assert float(halting.entropy_bits(jnp.array([100.0, 0, 0, 0]))) < 1e-3
