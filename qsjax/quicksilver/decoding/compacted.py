"""A physically smaller cache per layer: each layer keeps only the prompt entries it still shows.

After a QuickSilver prompt (scope=context) layer l shows the entries with visible_l[b, s] (a halted
token's masked keys, a fused token's retired ones and padding are hidden; zeroed and propagated keys
stay visible, so they stay). The compacted cache gathers them, in slot order, into P_l places:

    n_l     = max_b  sum_s visible_l[b, s]                 (read on the host, once, after the prefill)
    P_l     = bucket(n_l)                                  (a power of two >= 16: few compiled shapes)
    place p of row b holds its (p - (P_l - n_lb))-th visible entry, right-aligned; EMPTY before
    places P_l .. S_l - 1: the generated tokens, S_l = P_l + new tokens

with each entry's slot (so positions and the causal rule are unchanged) and score bias (log of its
fused group's size; 0 for generated tokens). Attention over a layer's places is then attention over
the masked cache's visible slots: the same logits (to float rounding), with layers above a cut-off
holding a few places instead of the whole prompt. Each distinct tuple (P_1, ..., P_L) is one compiled
decode program; a prompt bucket of T tokens allows log2(T / 16) + 1 sizes per layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qsjax.runtime.buckets import bucket
from qsjax.dense.kvcache import EMPTY, KVCache
from qsjax.dense.model import decode_step
from qsjax.quicksilver.decoding.cache import QuickSilverCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompactedCache:
    """A KVCache whose layer l holds S_l places, and each place's score bias (L x [B, S_l])."""

    kv: KVCache
    bias: tuple[jax.Array, ...]

    def decode_step(self, module, tokens):
        """One generated token per row (visible in every layer, no bias).  tokens [B] -> logits [B, V], new cache"""
        logits, kv = decode_step(module, self.kv, tokens, None, self.bias)
        return logits, dataclasses.replace(self, kv=kv)


def visible_counts(cache: QuickSilverCache):
    """The most entries any row shows, per layer, among the written slots.  -> [L] int32"""
    written = jnp.arange(cache.visible.shape[2]) < cache.kv.index
    return (cache.visible & written).sum(-1).max(-1).astype(jnp.int32)


def kept_places(counts, prompt_slots: int) -> tuple[int, ...]:
    """P_l for the host's per-layer counts [L]: a power of two >= 16, at most the prompt's slots."""
    return tuple(min(bucket(int(n)), prompt_slots) for n in np.asarray(counts))


def compact(cache: QuickSilverCache, kept: tuple[int, ...], new_tokens: int) -> CompactedCache:
    """Gather each layer's visible entries of a freshly prefilled cache into `kept[l]` places (each
    >= that layer's count, see `kept_places`), with room for `new_tokens` generated tokens."""
    kv = cache.kv
    written = jnp.arange(cache.visible.shape[2]) < kv.index
    ks, vs, slots, biases = [], [], [], []
    for l, P in enumerate(kept):
        shown = cache.visible[l] & written[None]  # [B, S]
        order = jnp.argsort(shown, axis=-1, stable=True)[:, -P:]  # hidden first, then shown in slot order: [B, P]
        keep = jnp.take_along_axis(shown, order, axis=-1)
        room = new_tokens
        heads = lambda a: _pad_places(jnp.take_along_axis(a, order[:, None, :, None], axis=2), 2, room)  # [B, K, S_l, Dh]
        ks.append(heads(kv.k[l]))
        vs.append(heads(kv.v[l]))
        slot = jnp.where(keep, jnp.take_along_axis(kv.slot[l], order, axis=-1), EMPTY)
        slots.append(_pad_places(slot, 1, room, EMPTY))
        biases.append(_pad_places(jnp.where(keep, jnp.take_along_axis(cache.bias[l], order, axis=-1), 0.0), 1, room))
    fill = jnp.asarray(kept, jnp.int32)
    return CompactedCache(KVCache(tuple(ks), tuple(vs), tuple(slots), kv.start, kv.index, fill), tuple(biases))


def _pad_places(a, axis: int, room: int, value=0):
    """`room` more places after the last along `axis`, holding `value`."""
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, room)
    return jnp.pad(a, widths, constant_values=value)
