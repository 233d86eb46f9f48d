"""The cache a QuickSilver prompt leaves: the dense KV cache plus, per layer, which slots may be
attended to and each slot's score bias (log of its fused group's size).

A token halted before layer l has, in layer l, a key/value masked (not visible), zeroed or
propagated (`kvskip`); a token retired by fusion is invisible above its fusion layer. Decoding a
token that no mechanism touches (scope=context) is the dense `model.decode_step` with this mask and
bias passed through its seam.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qsjax.dense.kvcache import KVCache
from qsjax.dense.model import decode_step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuickSilverCache:
    kv: KVCache
    visible: jax.Array  # [L, B, S] bool
    bias: jax.Array  # [L, B, S] float32

    @classmethod
    def from_window(cls, entries, start, length: int) -> QuickSilverCache:
        """A cache of `length` slots from a prefilled window's per-layer `state.CacheEntries` ([L, B, T, ...])."""
        pad = [(0, 0), (0, 0), (0, length - entries.visible.shape[2])]
        return cls(KVCache.from_window(entries.k, entries.v, start, length), jnp.pad(entries.visible, pad),
                   jnp.pad(entries.bias, pad))

    def write(self, layer: int, k, v, visible, bias) -> QuickSilverCache:
        """Layer `layer`'s (0-based block index) entry for slot `index`: k, v [B, 1, K, Dh], visible and bias [B]."""
        at = (layer, 0, self.kv.index)
        return QuickSilverCache(self.kv.write(layer, k, v),
                                jax.lax.dynamic_update_slice(self.visible, visible[None, :, None], at),
                                jax.lax.dynamic_update_slice(self.bias, bias[None, :, None].astype(self.bias.dtype), at))

    def retire_previous(self, rows, above: int) -> QuickSilverCache:
        """The token at slot index - 1 of the given rows [B] vanishes from the layers above layer `above` (1-based)."""
        L, B = self.visible.shape[:2]
        gone = (jnp.arange(L) >= above)[:, None, None] & rows[None, :, None]  # [L, B, 1]
        at = (0, 0, self.kv.index - 1)
        kept = jax.lax.dynamic_slice(self.visible, at, (L, B, 1)) & ~gone
        return dataclasses.replace(self, visible=jax.lax.dynamic_update_slice(self.visible, kept, at))

    def advance(self) -> QuickSilverCache:
        return dataclasses.replace(self, kv=self.kv.advance())

    def decode_step(self, module, tokens):
        """A token no mechanism touches, at slot `index`: visible in every layer, no bias.
        tokens [B] -> logits [B, V], new cache"""
        L, B = self.visible.shape[:2]
        at = (0, 0, self.kv.index)
        visible = jax.lax.dynamic_update_slice(self.visible, jnp.ones((L, B, 1), bool), at)
        bias = jax.lax.dynamic_update_slice(self.bias, jnp.zeros((L, B, 1), self.bias.dtype), at)
        logits, kv = decode_step(module, self.kv, tokens, visible, bias)
        return logits, QuickSilverCache(kv, visible, bias)
