"""Bucketed compaction: run a function only on the rows that need it, with static shapes.

The selected rows are gathered into a buffer whose length is the smallest of a few fixed buckets
that holds them all, the function runs on that buffer, and the results are scattered back. Which
bucket runs is chosen by one scalar (`lax.switch`), so only that bucket's work is executed; nothing
is ever dropped, because the largest bucket is the full length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def buckets_for(n: int, smallest: int = 64, factor: int = 4) -> tuple[int, ...]:
    """Bucket sizes n, n/factor, n/factor^2, ... down to `smallest`, ascending."""
    sizes = [n]
    while sizes[-1] // factor >= smallest:
        sizes.append(sizes[-1] // factor)
    return tuple(sorted(set(sizes)))


def compaction_buckets(n: int) -> tuple[int, ...]:
    """Buffer lengths for a window of n tokens: 64 and 128, then every multiple of n / 16 up to n
    (finer than powers of two where it matters: the 516 computing tokens of a 2,048-token window
    whose last 512 are scored, plus 4 sinks, take a 640 buffer, not 1,024)."""
    step = max(1, n // 16)
    sizes = {s for s in (64, 128) if s < n} | {min(n, k * step) for k in range(1, 17)} | {n}
    return tuple(sorted(sizes))


def on_rows(fn, x, rows, out_shape, out_dtype, buckets=None):
    """fn applied to the selected rows of x, zeros elsewhere.

    x [N, ...], rows [N] bool, fn: [n, ...] -> [n, *out_shape]  ->  [N, *out_shape].
    No row selected: fn does not run at all."""
    N = x.shape[0]
    buckets = buckets_for(N) if buckets is None else buckets
    count = rows.sum()

    def empty():
        return jnp.zeros((N, *out_shape), out_dtype)

    def run(size):
        def branch():
            (idx,) = jnp.nonzero(rows, size=size, fill_value=N)  # padding indices point past the end
            y = fn(x[jnp.minimum(idx, N - 1)])
            return empty().at[idx].set(y.astype(out_dtype), mode="drop")

        return branch

    index = jnp.where(count == 0, 0, 1 + jnp.searchsorted(jnp.asarray(buckets), count))
    return jax.lax.switch(index, [empty] + [run(b) for b in buckets])
