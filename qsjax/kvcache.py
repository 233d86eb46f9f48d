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
    # QuickSilver only (None for a dense cache): per layer, which slots may be attended to, and the
    # score bias of each slot (log of the fused group size)
    visible: jax.Array | None = None  # [L, B, S] bool
    bias: jax.Array | None = None  # [L, B, S] float32

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, start, dtype=jnp.float32) -> KVCache:
        shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.asarray(start, jnp.int32), jnp.int32(0))

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def slots_valid(self):
        """Which slots hold a real token (written, and not left padding).  -> [B, S] bool"""
        slots = jnp.arange(self.length)
        return (slots[None, :] >= self.start[:, None]) & (slots[None, :] < self.index)
