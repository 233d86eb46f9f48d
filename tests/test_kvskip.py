"""KV Cache Skipping: which halted tokens' keys stay visible, and whose K/V are written, per mode."""

import jax.numpy as jnp
import numpy as np

from qsjax.quicksilver.mechanisms import kvskip

# four tokens at layer 5: computing, halted after 4, halted after 2, padding
computing = jnp.array([[True, False, False, False]])
halted = jnp.array([[False, True, True, False]])
halt_layer = jnp.array([[6, 4, 2, 6]])
valid = jnp.array([[True, True, True, False]])


def visible(mode, span=None):
    return np.asarray(kvskip.visible_keys(mode, 5, computing, halted, halt_layer, valid, span))[0].tolist()


def test_visible_keys_per_mode():
    assert visible("mask") == [True, False, False, False]
    assert visible("zero") == [True, True, True, False]  # zero keys stay, and take softmax mass
    assert visible("propagate") == [True, True, True, False]
    assert visible("propagate", span=1) == [True, True, False, False]  # 5 - 2 > 1: masked beyond the span


def test_writes_kv_counts_propagated_projections():
    writes = lambda mode, span=None: np.asarray(kvskip.writes_kv(mode, computing, halted, halt_layer, 5, span))[0].tolist()
    assert writes("mask") == writes("zero") == [True, False, False, False]
    assert writes("propagate") == [True, True, True, False]
    assert writes("propagate", span=2) == [True, True, False, False]


def test_zero_halted_only_in_zero_mode(rng):
    k = jnp.asarray(rng.normal(size=(1, 4, 2, 8)).astype(np.float32))
    v = k + 1
    zk, zv = kvskip.zero_halted(k, v, halted, "zero")
    assert not np.asarray(zk)[0, 1:3].any() and not np.asarray(zv)[0, 1:3].any()
    np.testing.assert_array_equal(np.asarray(zk)[0, [0, 3]], np.asarray(k)[0, [0, 3]])
    for mode in ("mask", "propagate"):
        same = kvskip.zero_halted(k, v, halted, mode)
        assert same[0] is k and same[1] is v
