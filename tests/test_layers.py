"""The pure math functions: blocked causal attention equals plain attention; norms."""

import jax.numpy as jnp
import numpy as np
import pytest

from qsjax.layers import attend, attend_causal, causal_mask, layer_norm, rms_norm


@pytest.mark.parametrize("T, block", [(300, 128), (256, 64), (100, 128)])
def test_blocked_causal_attention_equals_attend(T, block, rng):
    q = jnp.asarray(rng.normal(size=(2, T, 6, 16)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(2, T, 2, 16)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(2, T, 2, 16)).astype(np.float32))
    valid = jnp.asarray(np.arange(T)[None, :] >= np.array([[0], [37]]))  # row 1 left-padded
    valid = valid & jnp.asarray(rng.random((2, T)) > 0.1)  # and some keys hidden, as QuickSilver does
    mask = causal_mask(jnp.arange(T), jnp.arange(T), valid)
    bias = jnp.asarray(rng.normal(size=(2, 1, T)).astype(np.float32))
    seen = np.asarray(mask.any(-1))  # a query with no visible key (padding) has no meaningful output
    got, want = np.asarray(attend_causal(q, k, v, mask, bias, block)), np.asarray(attend(q, k, v, mask, bias))
    np.testing.assert_allclose(got[seen], want[seen], atol=2e-6)


def test_fully_masked_rows_are_finite(rng):
    q = jnp.ones((1, 4, 2, 8))
    k = v = jnp.ones((1, 4, 2, 8))
    out = attend(q, k, v, jnp.zeros((1, 4, 4), bool))
    assert np.isfinite(np.asarray(out)).all()


def test_norms(rng):
    x = jnp.asarray(rng.normal(3, 2, (4, 32)).astype(np.float32))
    y = np.asarray(layer_norm(x, jnp.ones(32), jnp.zeros(32), 1e-5))
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1, atol=1e-3)
    r = np.asarray(rms_norm(x, jnp.ones(32), 1e-6))
    np.testing.assert_allclose(np.sqrt((r**2).mean(-1)), 1, atol=1e-4)
