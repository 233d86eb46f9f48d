"""QuickSilver in generation: the prompt runs through the mechanisms, the cache keeps their result.

`scope=context`: every prompt token but the last may halt or fuse; the last prompt token and every
generated token run all layers, attending to what the prompt left in each layer's cache (halted
tokens' keys masked, zeroed or propagated; a fused group's single key with its log-size bias):
`QuickSilverCache.decode_step`.
`scope=all`: the last prompt token and every generated token are eligible too (the paper's
semantics): each decode step runs the mechanisms on its token (`decode`), with the decisions the
window pass over the whole sequence would make.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qsjax import blocks
from qsjax.model import Layout, Model
from qsjax.quicksilver.cache import QuickSilverCache
from qsjax.quicksilver.config import QuickSilverConfig
from qsjax.quicksilver.decode import DecodeState, quicksilver_decode_step
from qsjax.quicksilver.matryoshka import quantize_blocks
from qsjax.quicksilver.state import LayerStats, Tokens
from qsjax.quicksilver.window import quicksilver_window


def prepare(model: Model, qs: QuickSilverConfig) -> Model:
    """The model as QuickSilver runs it: layers >= amq_layer stored as int8 (float weights dropped)."""
    qs.validate_for(model.cfg.n_layers)
    if qs.amq_layer is None:
        return model
    module = model.module()
    quantize_blocks(module, qs.amq_layer - 1, grouped=qs.compact)
    return dataclasses.replace(Model.from_module(module), mesh=model.mesh)


def prompt_in_scope(qs: QuickSilverConfig, valid):
    """Prompt tokens the scope lets the mechanisms touch: all real ones, or (context) all but the last slot."""
    if qs.scope == "all":
        return valid
    return valid.at[:, -1].set(False)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefill:
    """A QuickSilver prompt: the last position's logits [B, V], what decoding continues from (a
    QuickSilverCache, or under scope=all a DecodeState), the prompt's decisions and per-layer stats."""

    logits: jax.Array
    state: QuickSilverCache | DecodeState
    tokens: Tokens
    stats: LayerStats


def quicksilver_prefill(qs: QuickSilverConfig, module, tokens, start, cache_length: int) -> Prefill:
    """A left-padded prompt batch through QuickSilver.  tokens [B, T], start [B]"""
    B, T = tokens.shape
    w = Layout.left_padded(module.cfg, start, T)
    needed = jnp.broadcast_to(jnp.arange(T) == T - 1, (B, T))  # only the last prompt token's prediction is read
    out = quicksilver_window(qs, module, tokens, w, prompt_in_scope(qs, w.valid), needed)
    cache = QuickSilverCache.from_window(out.layers.cache, start, cache_length)
    state = DecodeState(cache, out.layers.view) if qs.scope == "all" else cache
    return Prefill(blocks.lm_logits(module, out.x[:, -1]), state, out.tokens, out.layers.stats)


def quicksilver_decode(qs: QuickSilverConfig, module, state, tokens):
    """One generated token per row after `quicksilver_prefill`.  -> logits [B, V], new state"""
    if qs.scope == "all":
        return quicksilver_decode_step(qs, module, state, tokens)[:2]
    return state.decode_step(module, tokens)
