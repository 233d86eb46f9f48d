"""Dynamic Token Halting's building blocks: drift, entropy, selection."""

import jax.numpy as jnp
import numpy as np

from qsjax.quicksilver import halting


def test_drift_relative_and_raw():
    old = jnp.array([[3.0, 4.0]])
    new = jnp.array([[3.0, 4.5]])
    assert float(halting.drift(new, old, relative=False)[0]) == 0.5
    assert abs(float(halting.drift(new, old)[0]) - 0.1) < 1e-6


def test_entropy_bits():
    assert abs(float(halting.entropy_bits(jnp.zeros(8))) - 3.0) < 1e-5  # uniform over 8: 3 bits
    assert float(halting.entropy_bits(jnp.array([100.0, 0, 0, 0]))) < 1e-3


def test_select_keep_top_fraction():
    score = jnp.array([[5.0, 1.0, 3.0, 4.0, 2.0, 9.0]])
    cand = jnp.array([[True, True, True, True, True, False]])
    keep = np.asarray(halting.select_keep(score, cand, 0.4))[0]
    assert keep.tolist() == [True, False, False, True, False, False]  # 2 of 5 candidates, best scores


def test_last_n():
    mask = jnp.array([[True, False, True, True, False, True]])
    assert np.asarray(halting.last_n(mask, 2))[0].tolist() == [False, False, False, True, False, True]


def test_attention_received_sums_each_voters_distribution(rng):
    q = jnp.asarray(rng.normal(size=(1, 6, 4, 8)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(1, 6, 2, 8)).astype(np.float32))
    voters = jnp.array([[False, False, False, False, True, True]])
    got = halting.attention_received(q, k, voters, jnp.ones((1, 6), bool))
    assert abs(float(got.sum()) - 2 * 4) < 1e-4  # two voters x four heads, each distribution sums to 1
    assert float(got[0, 5]) > 0 and got.shape == (1, 6)
