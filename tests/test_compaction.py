"""Bucketed compaction: a function run on the selected rows only equals it run everywhere and masked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsjax.quicksilver.window.rows import buckets_for, compaction_buckets, on_rows


@pytest.mark.parametrize("n", [1, 3, 64, 100, 2048])
def test_buckets_are_ascending_and_end_at_n(n):
    for buckets in (buckets_for(n), buckets_for(n, smallest=1, factor=2), compaction_buckets(n)):
        assert list(buckets) == sorted(set(buckets)) and buckets[-1] == n and buckets[0] >= 1


def test_compaction_buckets_follow_their_rule():
    assert compaction_buckets(2048) == (64, 128) + tuple(range(128, 2049, 128))[1:]
    assert 640 in compaction_buckets(2048)  # 516 computing tokens take a 640 buffer, not 1,024
    assert compaction_buckets(160) == (64, 128, 160)


@pytest.mark.parametrize("selected", [0, 1, 5, 17, 40, 64])
def test_on_rows_equals_masked_application(selected, rng):
    N, D = 64, 8
    rows = np.zeros(N, bool)
    rows[rng.choice(N, selected, replace=False)] = True
    x = jnp.asarray(rng.normal(size=(N, D)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(D, D)).astype(np.float32))
    default = -jnp.ones((N, D))
    calls = []

    def fn(a):
        calls.append(a.shape[0])  # traced once per bucket branch
        return jnp.tanh(a @ w)

    got = jax.jit(lambda r, a: on_rows(fn, r, default, a, buckets=(4, 16, 64)))(jnp.asarray(rows), x)
    want = np.where(rows[:, None], np.tanh(np.asarray(x) @ np.asarray(w)), -1.0)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    assert sorted(set(calls)) == [4, 16, 64]  # every bucket is a branch; only the one that fits runs
