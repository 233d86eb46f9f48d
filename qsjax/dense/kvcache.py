"""A functional, preallocated key/value cache whose layers may hold different entries.

One buffer per layer for K and for V, each [B, K, S_l, Dh]: heads-major, so that a decode step's
attention reads a layer's keys as they lie (a token-major [B, S, K, Dh] cache was transposed, a copy
of the whole layer, at every step), and one buffer per layer, so that layers hold different numbers
of places S_l (a compacted cache keeps only what each layer still shows, `quicksilver/compacted.py`;
an evicting one a budget, `eviction.py`). Every step returns a new cache (under jit with donation the
update happens in place).

Each place of layer l holds the entry of one token, named by its slot (the token's order in the
sequence, the slot attention's causal rule reads), or nothing (slot EMPTY, which no query sees):

    slot[l][b, p] = the slot of the token whose key/value sits at place p of row b, else EMPTY.

Prompts are left-padded so that every row's next token has the same slot `index`; `start[b]` is the
first slot holding a real token of row b, and the position (RoPE) of slot s in row b is s - start[b].
Every row writes its next token at the same place `fill[l]` of layer l (a dense cache: the place is
the slot, fill[l] = index).
"""

from __future__ import annotations

import dataclasses

import math

import jax
import jax.numpy as jnp

from qsjax.dense.attention import PLAIN, Own, attention_heads_major, attention_run, attention_step
from qsjax.dense.config import ModelConfig

EMPTY = jnp.iinfo(jnp.int32).max  # the slot of a place that holds nothing: above every query's slot


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # L x [B, K, S_l, Dh]
    v: tuple[jax.Array, ...]  # L x [B, K, S_l, Dh]
    slot: tuple[jax.Array, ...]  # L x [B, S_l] int32, the slot of each place's token (EMPTY: none)
    start: jax.Array  # [B] int32, first real slot of each row
    index: jax.Array  # [] int32, the slot of the next token
    fill: jax.Array  # [L] int32, the place of layer l the next token goes to

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, start, dtype=jnp.float32) -> KVCache:
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
        L = cfg.n_layers
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(L)), tuple(jnp.zeros(shape, dtype) for _ in range(L)),
                   tuple(jnp.full((batch, length), EMPTY, jnp.int32) for _ in range(L)), jnp.asarray(start, jnp.int32),
                   jnp.int32(0), jnp.zeros(L, jnp.int32))

    @classmethod
    def from_window(cls, k, v, start, length: int) -> KVCache:
        """A cache of `length` places holding a prefilled window's keys and values in its first T places
        (place = slot).  k, v [L, B, T, K, Dh] (as a window pass stacks them), start [B]"""
        L, B, T = k.shape[:3]
        start = jnp.asarray(start, jnp.int32)
        pad = [(0, 0), (0, 0), (0, length - T), (0, 0)]
        layers = lambda a: tuple(jnp.pad(a[l].transpose(0, 2, 1, 3), pad) for l in range(L))
        places = jnp.arange(length, dtype=jnp.int32)[None, :]
        slot = jnp.where((places >= start[:, None]) & (places < T), places, EMPTY)  # [B, S]
        return cls(layers(k), layers(v), (slot,) * L, start, jnp.int32(T), jnp.full(L, T, jnp.int32))

    def length(self, layer: int = 0) -> int:
        """Places of a layer (0-based)."""
        return self.k[layer].shape[2]

    def holds(self, layer: int = 0):
        """Which places of a layer hold a real token's entry.  -> [B, S_l] bool"""
        return self.slot[layer] != EMPTY

    def positions(self):
        """Position of the next token (slot `index`), per row.  -> [B] int32"""
        return self.index - self.start

    def write(self, layer: int, k, v, place=None, slot=None) -> KVCache:
        """Layer `layer`'s (0-based) key and value of the next token (slot `index`, or slot[b] in row b:
        slot [B] int32), at place `fill[layer]` of every row, or at place[b] of row b (place [B] int32).
        k, v [B, 1, K, Dh]"""
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, 1, Dh]
        B = k.shape[0]
        new_slot = jnp.broadcast_to(self.index if slot is None else slot[:, None], (B, 1)).astype(jnp.int32)
        axis = lambda buf: 2 if buf.ndim == 4 else 1  # the place axis of k, v [B, K, S, Dh] and slot [B, S]
        if place is None:
            put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x, self.fill[layer], axis(buf))
        else:  # one place per row
            row = lambda b, x, p: jax.lax.dynamic_update_slice_in_dim(b[None], x[None], p, axis(b[None]))[0]
            put = lambda buf, x: jax.vmap(row)(buf, x, place)
        replace = lambda bufs, x: tuple(put(b, x) if i == layer else b for i, b in enumerate(bufs))
        return dataclasses.replace(self, k=replace(self.k, k), v=replace(self.v, v), slot=replace(self.slot, new_slot))

    def attend(self, layer: int, q, k, v, key_mask=None, key_bias=None, rule=PLAIN):
        """Write the next token's key and value in layer `layer` (0-based) and attend over the layer's
        entries and its own: q [B, 1, H, Dh], k, v [B, 1, K, Dh]; key_mask [B, S_l] bool (None: every
        entry), key_bias [B, S_l] (None: nothing; the own entry gets the bias of the place it is
        written to); rule: the layer's (`attention.Rule`)  -> new cache, o [B, 1, H, Dh]
        Attention reads the cache as it was, the own entry beside it (`attention.attention_step`),
        and the write follows (`after`), so that a compiled step reads each buffer once and
        updates it in place."""
        slot, fill = self.slot[layer], self.fill[layer]
        q_slot = jnp.broadcast_to(self.index, (slot.shape[0], 1))
        ok = jnp.arange(slot.shape[1]) != fill  # the place written holds the new entry, not its old one
        ok = ok[None] if key_mask is None else ok & key_mask
        own_bias = None if key_bias is None else jax.lax.dynamic_index_in_dim(key_bias, fill, 1, keepdims=False)
        own = Own(k[:, 0], v[:, 0], own_bias)
        o = attention_step(q, self.k[layer], self.v[layer], own, q_slot, slot, jnp.broadcast_to(ok, slot.shape),
                           key_bias, rule=rule)
        return self.after(o).write(layer, k, v), o

    def after(self, read) -> KVCache:
        """The same cache, its writes made to wait for `read` (an array computed from its buffers).
        XLA updates a buffer in place only after the reads it can see must come first, i.e. those
        the update depends on; otherwise it copies the buffer (for a decode step: every layer's keys,
        values and slots, at every step). So the write place is given a dependency on what the step
        read, by adding a term that is always 0 (no number exceeds +inf; NaN neither)."""
        late = (read.max() > jnp.inf).astype(jnp.int32)  # 0
        return dataclasses.replace(self, fill=self.fill + late)

    def attention(self, layer: int, q, key_mask=None, key_bias=None, rule=PLAIN, q_slot=None):
        """The next token's query over layer `layer`'s entries (its own included); its slot `index`, or
        q_slot[b] in row b (q_slot [B]).  -> [B, 1, H, Dh]"""
        slot = self.slot[layer]
        q_slot = jnp.broadcast_to(self.index if q_slot is None else q_slot[:, None], (slot.shape[0], 1))
        ok = jnp.ones(slot.shape, bool) if key_mask is None else key_mask
        return attention_heads_major(q, self.k[layer], self.v[layer], q_slot, slot, ok, key_bias, self_visible=True,
                                     rule=rule)

    def run_slots(self, lead, T: int):
        """The slots of a run of T tokens per row that starts `lead[b]` slots after `index` (speculative
        decoding: rows that accepted different counts of drafted tokens).  lead [B] -> [B, T] int32"""
        return (self.index + lead)[:, None].astype(jnp.int32) + jnp.arange(T, dtype=jnp.int32)

    def run_attend(self, layer: int, q, k, v, lead, key_mask=None, key_bias=None, rule=PLAIN):
        """A run of T tokens per row in layer `layer`: its queries attend over the layer's entries and
        the run's own (causally; `attention.attention_run`: read where they lie, then written), and its
        keys and values are written at places fill[layer] + lead[b] + j with slots `run_slots(lead, T)`,
        over whatever a rejected draft left there.  q [B, T, H, Dh], k, v [B, T, K, Dh], lead [B];
        key_mask, key_bias [B, S_l] or None: the cached entries' (the run's own are shown, unbiased)
        -> new cache, o [B, T, H, Dh]"""
        T, slot = q.shape[1], self.slot[layer]
        ok = jnp.ones(slot.shape, bool) if key_mask is None else key_mask
        o = attention_run(q, self.k[layer], self.v[layer], k, v, self.run_slots(lead, T), slot, ok, key_bias, rule=rule)
        return self.after(o).write_run(layer, k, v, lead), o

    def write_run(self, layer: int, k, v, lead) -> KVCache:
        """Layer `layer`'s keys and values of a run, k, v [B, T, K, Dh], at places fill[layer] + lead[b] + j."""
        place = self.fill[layer] + lead  # [B]
        axis = lambda buf: 1 if buf.ndim == 3 else 0  # a row's place axis: k, v [K, S, Dh], slot [S]
        put = jax.vmap(lambda buf, x, p: jax.lax.dynamic_update_slice_in_dim(buf, x, p, axis(buf)))
        replace = lambda bufs, x: tuple(put(b, x, place) if i == layer else b for i, b in enumerate(bufs))
        heads = lambda x: x.transpose(0, 2, 1, 3)  # [B, K, T, Dh]
        return dataclasses.replace(self, k=replace(self.k, heads(k)), v=replace(self.v, heads(v)),
                                   slot=replace(self.slot, self.run_slots(lead, k.shape[1])))

    def advance(self) -> KVCache:
        return dataclasses.replace(self, index=self.index + 1, fill=self.fill + 1)


def cache_bytes(tree) -> int:
    """Bytes a cache holds: the sum over its pytree's leaves (arrays, or `jax.eval_shape`'s
    abstract ones) of elements x item size, whatever its structure (a KVCache, a QuickSilver cache
    with its visibility and bias, layers of different lengths)."""
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def dense_cache_bytes(cfg: ModelConfig, batch: int, length: int, dtype) -> int:
    """What the dense KVCache of this batch and length holds (nothing is allocated)."""
    return cache_bytes(jax.eval_shape(lambda: KVCache.empty(cfg, batch, length, jnp.zeros(batch, jnp.int32), dtype)))
