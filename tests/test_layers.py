"""The pure math functions: norms, the fused projections' layouts (attention has its own file, test_attention.py)."""

import jax.numpy as jnp
import numpy as np

from qsjax.dense.layers import fuse_gate_up, fuse_qkv, layer_norm, rms_norm, silu, split_qkv, swiglu


def test_norms(rng):
    x = jnp.asarray(rng.normal(3, 2, (4, 32)).astype(np.float32))
    y = np.asarray(layer_norm(x, jnp.ones(32), jnp.zeros(32), 1e-5))
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1, atol=1e-3)
    r = np.asarray(rms_norm(x, jnp.ones(32), 1e-6))
    np.testing.assert_allclose(np.sqrt((r**2).mean(-1)), 1, atol=1e-4)


def test_fused_qkv_is_the_three_maps_grouped_by_key_value_head(rng):
    """split(x @ fuse(Wq, Wk, Wv)) == x Wq, x Wk, x Wv; group k holds query heads kG..kG+G-1, key and value k."""
    B, T, D, H, K, Dh = 2, 3, 16, 6, 2, 4
    wq, wk, wv = (jnp.asarray(rng.normal(size=(D, n * Dh)).astype(np.float32)) for n in (H, K, K))
    x = jnp.asarray(rng.normal(size=(B, T, D)).astype(np.float32))
    w = fuse_qkv(wq, wk, wv, K)
    assert w.shape == (D, (H + 2 * K) * Dh)
    np.testing.assert_array_equal(w[:, :3 * Dh], wq[:, :3 * Dh])  # group 0: query heads 0, 1, 2 ...
    np.testing.assert_array_equal(w[:, 3 * Dh:4 * Dh], wk[:, :Dh])  # ... key head 0
    np.testing.assert_array_equal(w[:, 5 * Dh:8 * Dh], wq[:, 3 * Dh:])  # group 1: query heads 3, 4, 5
    q, k, v = split_qkv(x @ w, K, Dh)
    for got, want in ((q, x @ wq), (k, x @ wk), (v, x @ wv)):
        np.testing.assert_allclose(got, want.reshape(got.shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fuse_qkv(wq[0], wk[0], wv[0], K), w[0])  # biases fuse the same way


def test_fused_gate_up_is_silu_gate_times_up(rng):
    D, F = 8, 5
    wg, wu = (jnp.asarray(rng.normal(size=(D, F)).astype(np.float32)) for _ in range(2))
    x = jnp.asarray(rng.normal(size=(3, D)).astype(np.float32))
    w = fuse_gate_up(wg, wu)
    np.testing.assert_array_equal(w[:, 0::2], wg)
    np.testing.assert_array_equal(w[:, 1::2], wu)
    np.testing.assert_allclose(swiglu(x @ w), silu(x @ wg) * (x @ wu), rtol=1e-5, atol=1e-6)
