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
    """Buffer lengths for a window of n tokens: 64 and 128, then every multiple of n / 16 (at least
    64) up to n. Finer than powers of two where it matters: the 516 computing tokens of a 2,048-token
    window whose last 512 are scored, plus 4 sinks, take a 640 buffer, not 1,024; short windows get
    few buckets (a 160-token window: 64, 128, 160), since each is one more layer body to compile."""
    step = max(64, n // 16)
    sizes = {s for s in (64, 128) if s < n} | {min(n, k * step) for k in range(1, 17)} | {n}
    return tuple(sorted(sizes))


def decode_row_buckets(batch: int) -> tuple[int, ...]:
    """Rows of a decode batch that still compute a layer: 1, 2, 4, ... up to the batch."""
    return buckets_for(batch, smallest=1, factor=2)


def on_rows(fn, rows, default, *args, buckets=None):
    """fn(*args) on the selected rows only, `default` elsewhere.

    rows [N] bool; `default` and every arg have a leading axis of N rows; fn maps n rows of the args
    to n rows shaped like `default`. The selected rows are gathered into the smallest bucket that
    holds them (`buckets`, ascending, the largest N; by default `buckets_for(N)`: N, N/4, N/16, ...,
    coarse, as for Matryoshka widths inside every compacted layer's own buckets); in the full bucket
    nothing is gathered (fn runs on every row and the unselected keep `default`); no row selected:
    fn does not run at all."""
    N = rows.shape[0]
    buckets = buckets_for(N) if buckets is None else buckets

    def run(size):
        if size == N:
            return lambda: jnp.where(rows.reshape(N, *[1] * (default.ndim - 1)), fn(*args).astype(default.dtype), default)

        def branch():
            (idx,) = jnp.nonzero(rows, size=size, fill_value=N)  # padding indices point past the end
            y = fn(*jax.tree.map(lambda a: a[jnp.minimum(idx, N - 1)], args))
            return default.at[idx].set(y.astype(default.dtype), mode="drop")

        return branch

    count = rows.sum()
    index = jnp.where(count == 0, 0, 1 + jnp.searchsorted(jnp.asarray(buckets), count))
    return jax.lax.switch(index, [lambda: default] + [run(b) for b in buckets])
