"""The pure math functions: norms (attention has its own file, test_attention.py)."""

import jax.numpy as jnp
import numpy as np

from qsjax.layers import layer_norm, rms_norm


def test_norms(rng):
    x = jnp.asarray(rng.normal(3, 2, (4, 32)).astype(np.float32))
    y = np.asarray(layer_norm(x, jnp.ones(32), jnp.zeros(32), 1e-5))
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1, atol=1e-3)
    r = np.asarray(rms_norm(x, jnp.ones(32), 1e-6))
    np.testing.assert_allclose(np.sqrt((r**2).mean(-1)), 1, atol=1e-4)
