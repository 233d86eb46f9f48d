"""QuickSilver in decode: one new token per row, with the decisions the window pass makes for it.

Under `scope=all` a generated token is eligible like any other, so each step runs it through the
layers as `window.quicksilver_window` would at its position, attending to the cache:

- halting after each layer (the drift + entropy rule, or the depth cut-off); a halted token's state
  is frozen and its keys/values in the layers above follow `kv_skip` (mask: not visible; zero: zero
  vectors; propagate: projected from the frozen state);
- fusion with the previous token, decided from the previous token's `FusionView` at each layer
  (kept from its own step). On fusion the previous token is retired: its keys/values above that
  layer vanish from the cache. It made its own prediction in its own step, at full depth, before
  this token existed, which is what the window pass reproduces for a token whose logits are needed;
- Matryoshka widths from the entropy on entering layer l_q.

With a batch, only the rows whose token still computes reach a layer's attention, output
projection and MLP: they are gathered into the smallest of 1, 2, 4, ... rows that holds them
(`rows.on_rows`: `lax.switch` on one scalar per layer), and scattered back.

Under `scope=context` generated tokens are never eligible: the plain `model.decode_step` runs them
over the cache the prompt left (see `generation`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qsjax.dense import blocks
from qsjax.dense.attention import attention_heads_major
from qsjax.dense.model import Layout
from qsjax.quicksilver.mechanisms import fusion, kvskip
from qsjax.quicksilver.decoding.cache import QuickSilverCache
from qsjax.quicksilver.window.rows import decode_row_buckets, on_rows
from qsjax.quicksilver.settings import QuickSilverConfig
from qsjax.quicksilver.window.step import (absorb, amq_bits, fusion_candidates, halt_after, halting_decision, key_bias,
                                           last_view, may_decide, visible_keys)
from qsjax.quicksilver.mechanisms.matryoshka import with_widths
from qsjax.quicksilver.window.state import Context, FusionView, Tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The cache (with per-layer visibility and bias) and the last token's fusion view per layer
    ([L, B, ...])."""

    cache: QuickSilverCache
    last: FusionView


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepDecisions:
    """This step's decisions, [B] each: the new token's halt layer and width, and whether the
    previous token was retired by fusion with it."""

    halt: jax.Array
    bits: jax.Array
    prev_fused: jax.Array


class Rows(NamedTuple):
    """What the rest of a block reads for each row whose new token computes (a leading axis of B
    rows, gathered by `on_rows`): the token's state x [B, 1, D], its query q [B, 1, H, Dh] and slot
    [B, 1]; the layer's cache, keys and values [B, K, S, Dh] with their slots, visibility and score
    bias [B, S]; and the token's Matryoshka width bits [B, 1]."""

    x: jax.Array
    q: jax.Array
    q_slot: jax.Array
    keys: jax.Array
    values: jax.Array
    k_slot: jax.Array
    ok: jax.Array
    bias: jax.Array
    bits: jax.Array


def rest_of_block(blk, r: Rows):
    """Attention over the cache (under the block's rule) and the block's tail for the computing rows:
    -> x [n, 1, D]."""
    o = attention_heads_major(r.q, r.keys, r.values, r.q_slot, r.k_slot, r.ok, r.bias, self_visible=True,
                              rule=blocks.rule(blk))
    return blocks.tail(blk, r.x, o, with_widths(r.bits))


def decode_layer(qs: QuickSilverConfig, module, li: int, tok: Tokens, qc: QuickSilverCache, ctx: Context,
                 prev: FusionView):
    """Block li (0-based) for the new token of each row, and this layer's decisions for it, by the
    rules the window pass uses (`window.step`). prev: the previous token's view at this layer, [B, 1]
    each.  -> Tokens, the cache with this layer's entry, the token's FusionView, fused [B]"""
    blk, layer, w = module.blocks[li], li + 1, ctx.layout
    B = tok.x.shape[0]
    # this layer's cache entry for the new slot, as the window pass leaves it
    visible = visible_keys(qs, layer, tok, w.valid)
    q, k, v = blocks.qkv(blk, tok.x, w.cos, w.sin, with_widths(tok.bits))  # [B, 1, ...]
    k, v = kvskip.zero_halted(k, v, tok.halted, qs.kv_skip)
    qc = qc.write(li, k, v, visible[:, 0], key_bias(tok, visible)[:, 0])
    rows = Rows(x=tok.x, q=q, q_slot=w.slots, keys=qc.kv.k[li], values=qc.kv.v[li], k_slot=qc.kv.slot[li],
                ok=qc.visible[li],  # padding and unwritten places: not visible; its own key: self_visible
                bias=qc.bias[li], bits=tok.bits)
    x = on_rows(functools.partial(rest_of_block, blk), tok.active[:, 0], tok.x, rows, buckets=decode_row_buckets(B))

    can = may_decide(ctx, tok, layer, module.cfg.n_layers)
    halt_now, _ = halting_decision(qs, module, layer, x, tok.x, can, ctx)
    tok = halt_after(dataclasses.replace(tok, x=x), layer, halt_now)
    view = last_view(tok, can & ~halt_now)
    fuse = jnp.zeros((B, 1), bool)
    if qs.fuse_threshold is not None:
        cand, merged, size = fusion_candidates(qs, layer, tok, can & ~halt_now, prev)
        fuse = fusion.fuses(cand, prev.candidate)
        view = dataclasses.replace(view, candidate=cand[:, -1])
        tok = absorb(tok, fuse, merged, size)
        qc = qc.retire_previous(fuse[:, 0], above=layer)  # its keys above this layer vanish
    return tok, qc, view, fuse[:, 0]


def quicksilver_decode_step(qs: QuickSilverConfig, module, state: DecodeState, tokens):
    """One new token per row at slot `cache.index`, under QuickSilver (scope=all).

    tokens [B] -> logits [B, V] (from the token's final, possibly frozen, state), new DecodeState,
    StepDecisions."""
    if qs.scope != "all" or qs.halt == "select":
        raise ValueError("the QuickSilver decode step is for scope=all, whose policies decide token by token")
    qc = state.cache
    B = tokens.shape[0]
    positions = qc.kv.positions()[:, None]  # [B, 1]
    ones = jnp.ones((B, 1), bool)
    w = Layout.of(module.cfg, positions, ones)
    ctx = Context(dataclasses.replace(w, slots=jnp.broadcast_to(qc.kv.index, (B, 1))), positions >= qs.n_sink, ones)
    tok = Tokens.start(blocks.embed(module, tokens[:, None], positions), ones, module.cfg.n_layers)
    prev_fused = jnp.zeros(B, bool)
    views = []
    for li in range(len(module.blocks)):
        if qs.amq_layer is not None and li + 1 == qs.amq_layer:
            tok = dataclasses.replace(tok, bits=amq_bits(qs, module, tok.x, ctx.eligible))
        prev = jax.tree.map(lambda a: a[li][:, None], state.last)
        tok, qc, view, fused = decode_layer(qs, module, li, tok, qc, ctx, prev)
        prev_fused = prev_fused | fused
        views.append(view)

    last = jax.tree.map(lambda *a: jnp.stack(a), *views)
    decisions = StepDecisions(tok.halt[:, 0], tok.bits[:, 0], prev_fused)
    return blocks.lm_logits(module, tok.x[:, 0]), DecodeState(qc.advance(), last), decisions
