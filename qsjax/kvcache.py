"""A functional, preallocated key/value cache.

One buffer per layer for K and for V, each [B, K, S, Dh]: heads-major, so that a decode step's
attention reads a layer's keys as they lie (a token-major [B, S, K, Dh] cache was transposed, a copy
of the whole layer, at every step), and one buffer per layer, so that a step writes and reads a
layer without slicing it out of a stacked [L, ...] array (layers may later hold different numbers
of slots). Every step returns a new cache (under jit with donation the update happens in place).
Prompts are left-padded so that every row writes its next token at the same slot `index`;
`start[b]` is the first slot holding a real token of row b, and the position of slot s in row b is
s - start[b].
"""

from __future__ import annotations

import dataclasses

import math

import jax
import jax.numpy as jnp

from qsjax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # L x [B, K, S, Dh]
    v: tuple[jax.Array, ...]  # L x [B, K, S, Dh]
    start: jax.Array  # [B] int32, first real slot of each row
    index: jax.Array  # [] int32, next slot to write

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, start, dtype=jnp.float32) -> KVCache:
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
        return cls(zeros, tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)), jnp.asarray(start, jnp.int32),
                   jnp.int32(0))

    @classmethod
    def from_window(cls, k, v, start, length: int) -> KVCache:
        """A cache of `length` slots holding a prefilled window's keys and values in its first T slots.
        k, v [L, B, T, K, Dh] (as a window pass stacks them), start [B]"""
        pad = [(0, 0), (0, 0), (0, length - k.shape[2]), (0, 0)]
        layers = lambda a: tuple(jnp.pad(a[l].transpose(0, 2, 1, 3), pad) for l in range(a.shape[0]))
        return cls(layers(k), layers(v), jnp.asarray(start, jnp.int32), jnp.int32(k.shape[2]))

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def slots(self):
        """Slot numbers of the cache, per row.  -> [B, S] int32"""
        return jnp.broadcast_to(jnp.arange(self.length, dtype=jnp.int32), (self.start.shape[0], self.length))

    def slots_valid(self):
        """Which slots hold a real token (written, and not left padding).  -> [B, S] bool"""
        slots = jnp.arange(self.length)
        return (slots[None, :] >= self.start[:, None]) & (slots[None, :] < self.index)

    def positions(self):
        """Position of the token that goes to slot `index` next, per row.  -> [B] int32"""
        return self.index - self.start

    def write(self, layer: int, k, v) -> KVCache:
        """Layer `layer`'s (0-based) key and value of the tokens at slot `index`.  k, v [B, 1, K, Dh]"""
        at = (0, 0, self.index, 0)
        put = lambda buffers, x: tuple(jax.lax.dynamic_update_slice(b, x.transpose(0, 2, 1, 3), at) if i == layer else b
                                       for i, b in enumerate(buffers))
        return dataclasses.replace(self, k=put(self.k, k), v=put(self.v, v))

    def advance(self) -> KVCache:
        return dataclasses.replace(self, index=self.index + 1)


def cache_bytes(tree) -> int:
    """Bytes a cache holds: the sum over its pytree's leaves (arrays, or `jax.eval_shape`'s
    abstract ones) of elements x item size, whatever its structure (a KVCache, a QuickSilver cache
    with its visibility and bias, layers of different lengths)."""
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def dense_cache_bytes(cfg: ModelConfig, batch: int, length: int, dtype) -> int:
    """What the dense KVCache of this batch and length holds (nothing is allocated)."""
    return cache_bytes(jax.eval_shape(lambda: KVCache.empty(cfg, batch, length, jnp.zeros(batch, jnp.int32), dtype)))
