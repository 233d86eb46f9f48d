"""QuickSilver in generation: the prompt runs through the mechanisms, the cache keeps their result.

`scope=context`: every prompt token but the last may halt or fuse; the last prompt token and every
generated token run all layers, attending to what the prompt left in each layer's cache (halted
tokens' keys masked, zeroed or propagated; a fused group's single key with its log-size bias).
`scope=all`: the last prompt token and every generated token are eligible too (the paper's
semantics): each decode step runs the mechanisms on its token (`decode`), with the decisions the
window pass over the whole sequence would make.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qsjax.kvcache import KVCache
from qsjax.quicksilver.config import QuickSilverConfig
from qsjax.quicksilver.decode import DecodeState
from qsjax.quicksilver.forward import quicksilver_window
from qsjax.quicksilver.matryoshka import quantize_blocks


def prepare(model, qs: QuickSilverConfig):
    """The model as QuickSilver runs it: layers >= amq_layer stored as int8 (float weights dropped)."""
    from qsjax.model import Model

    qs.validate_for(model.cfg.n_layers)
    if qs.amq_layer is None:
        return model
    module = model.module()
    quantize_blocks(module, qs.amq_layer - 1, grouped=qs.compact)
    return Model.from_module(module)


def prompt_eligible(qs: QuickSilverConfig, valid):
    """Prompt tokens the mechanisms may touch: all real ones, or (context) all but the last slot."""
    if qs.scope == "all":
        return valid
    return valid.at[:, -1].set(False)


def quicksilver_prefill(qs: QuickSilverConfig, module, tokens, start, cache_length: int):
    """Left-padded prompt batch through QuickSilver.  -> last logits [B, V], KVCache (with per-layer
    visibility and bias) or, under scope=all, the DecodeState that `decode.quicksilver_decode_step`
    continues from; decisions (Tokens), stats."""
    B, T = tokens.shape
    slots = jnp.arange(T)
    positions = jnp.maximum(slots[None, :] - start[:, None], 0)
    valid = slots[None, :] >= start[:, None]
    needed = jnp.broadcast_to(slots == T - 1, (B, T))  # only the last prompt token's prediction is read
    x, tok, stats, (k, v, visible, bias), _, views = quicksilver_window(
        qs, module, tokens, positions, valid, prompt_eligible(qs, valid), needed)
    L = module.cfg.n_layers
    cache = KVCache.empty(module.cfg, B, cache_length, start, k.dtype)
    cache = dataclasses.replace(
        cache,
        k=jax.lax.dynamic_update_slice(cache.k, k, (0, 0, 0, 0, 0)),
        v=jax.lax.dynamic_update_slice(cache.v, v, (0, 0, 0, 0, 0)),
        visible=jax.lax.dynamic_update_slice(jnp.zeros((L, B, cache_length), bool), visible, (0, 0, 0)),
        bias=jax.lax.dynamic_update_slice(jnp.zeros((L, B, cache_length), jnp.float32), bias, (0, 0, 0)),
        index=jnp.int32(T),
    )
    if qs.scope == "all":
        cache = DecodeState(cache, views)
    return module.logits(x[:, -1]), cache, tok, stats
