"""A functional, preallocated key/value cache.

One buffer per K and V of static shape [L, B, S, K, Dh]; every step returns a new cache (under jit
with donation the update happens in place). Prompts are left-padded so that every row writes its
next token at the same slot `index`; `start[b]` is the first slot holding a real token of row b,
and the position of slot s in row b is s - start[b].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qsjax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, S, K, Dh]
    v: jax.Array  # [L, B, S, K, Dh]
    start: jax.Array  # [B] int32, first real slot of each row
    index: jax.Array  # [] int32, next slot to write

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, start, dtype=jnp.float32) -> KVCache:
        shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.asarray(start, jnp.int32), jnp.int32(0))

    @classmethod
    def from_window(cls, k, v, start, length: int) -> KVCache:
        """A cache of `length` slots holding a prefilled window's keys and values in its first T slots.
        k, v [L, B, T, K, Dh], start [B]"""
        pad = [(0, 0), (0, 0), (0, length - k.shape[2]), (0, 0), (0, 0)]
        return cls(jnp.pad(k, pad), jnp.pad(v, pad), jnp.asarray(start, jnp.int32), jnp.int32(k.shape[2]))

    @property
    def length(self) -> int:
        return self.k.shape[2]

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
        """This layer's key and value of the tokens at slot `index`.  k, v [B, 1, K, Dh]"""
        at = (layer, 0, self.index, 0, 0)
        return dataclasses.replace(self, k=jax.lax.dynamic_update_slice(self.k, k[None], at),
                                   v=jax.lax.dynamic_update_slice(self.v, v[None], at))

    def advance(self) -> KVCache:
        return dataclasses.replace(self, index=self.index + 1)
