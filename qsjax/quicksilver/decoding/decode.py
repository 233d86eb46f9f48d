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
(`compaction.on_rows`: `lax.switch` on one scalar per layer), and scattered back.

Under `scope=context` generated tokens are never eligible: the plain `model.decode_step` runs them
over the cache the prompt left (see `generation`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qsjax.dense import blocks
from qsjax.dense.attention import attention_heads_major
from qsjax.dense.model import Layout
from qsjax.quicksilver.mechanisms import fusion, kvskip
from qsjax.quicksilver.decoding.cache import QuickSilverCache
from qsjax.quicksilver.window.rows import decode_row_buckets, on_rows
from qsjax.quicksilver.settings import QuickSilverConfig
from qsjax.quicksilver.window.step import amq_bits, halting_decision
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


def quicksilver_decode_step(qs: QuickSilverConfig, module, state: DecodeState, tokens):
    """One new token per row at slot `cache.index`, under QuickSilver (scope=all).

    tokens [B] -> logits [B, V] (from the token's final, possibly frozen, state), new DecodeState,
    StepDecisions."""
    if qs.scope != "all" or qs.halt == "select":
        raise ValueError("the QuickSilver decode step is for scope=all, whose policies decide token by token")
    L = module.cfg.n_layers
    qc = state.cache
    kv, i = qc.kv, qc.kv.index
    B = tokens.shape[0]
    positions = kv.positions()[:, None]  # [B, 1]
    ones = jnp.ones((B, 1), bool)
    w = Layout.of(module.cfg, positions, ones)
    ctx = Context(dataclasses.replace(w, slots=jnp.broadcast_to(i, (B, 1))), positions >= qs.n_sink, ones)
    tok = Tokens.start(blocks.embed(module, tokens[:, None], positions), ones, L)
    prev_fused = jnp.zeros(B, bool)
    views = []
    for li, blk in enumerate(module.blocks):
        layer = li + 1
        if qs.amq_layer is not None and layer == qs.amq_layer:
            tok = dataclasses.replace(tok, bits=amq_bits(qs, module, tok.x, ctx.eligible))
        computing = tok.active
        halted = tok.alive & ~tok.active
        linear = with_widths(tok.bits)

        # this layer's cache entry for the new slot, as the window pass leaves it
        visible = tok.alive & kvskip.visible_keys(qs.kv_skip, layer, computing, halted, tok.halt, ones, qs.kv_propagate_span)
        q, k, v = blocks.qkv(blk, tok.x, w.cos, w.sin, linear)  # [B, 1, ...]
        k, v = kvskip.zero_halted(k, v, halted, qs.kv_skip)
        qc = qc.write(li, k, v, visible[:, 0], jnp.where(visible | computing, jnp.log(tok.size), 0.0)[:, 0])

        def run(x, q, q_slot, keys, values, k_slot, ok, bias, bits, blk=blk):
            """The rest of the block for the computing rows: [n, 1, D] -> [n, 1, D]."""
            o = attention_heads_major(q, keys, values, q_slot, k_slot, ok, bias, self_visible=True)
            return blocks.tail(blk, x, o, with_widths(bits))

        ok = qc.visible[li]  # [B, S] (padding and unwritten places: not visible); its own key: self_visible
        x = on_rows(run, computing[:, 0], tok.x, tok.x, q, ctx.layout.slots, qc.kv.k[li], qc.kv.v[li], qc.kv.slot[li], ok,
                    qc.bias[li], tok.bits, buckets=decode_row_buckets(B))

        can = ctx.eligible & computing & (layer < L)
        halt_now, _ = halting_decision(qs, module, layer, x, tok.x, can, ctx)
        tok = dataclasses.replace(tok, x=x, active=tok.active & ~halt_now, halt=jnp.where(halt_now, layer, tok.halt))
        absorbable = can & ~halt_now
        view = FusionView(tok.x[:, 0], tok.size[:, 0], absorbable[:, 0], jnp.zeros(B, bool))
        if qs.fuse_threshold is not None:
            prev = jax.tree.map(lambda a: a[li], state.last)
            can_absorb = absorbable & ~tok.absorbed & (layer >= qs.halt_min_layer)
            cand, merged, size = fusion.decide(tok.x, tok.size, can_absorb, prev.x[:, None], prev.size[:, None],
                                               prev.absorbable[:, None], qs.fuse_threshold)
            fuse = cand & ~prev.candidate[:, None]  # [B, 1]
            view = dataclasses.replace(view, candidate=cand[:, 0])
            tok = dataclasses.replace(tok, x=jnp.where(fuse[..., None], merged, tok.x), size=jnp.where(fuse, size, tok.size),
                                      absorbed=tok.absorbed | fuse)
            qc = qc.retire_previous(fuse[:, 0], above=layer)  # its keys above this layer vanish
            prev_fused = prev_fused | fuse[:, 0]
        views.append(view)

    last = jax.tree.map(lambda *a: jnp.stack(a), *views)
    decisions = StepDecisions(tok.halt[:, 0], tok.bits[:, 0], prev_fused)
    return blocks.lm_logits(module, tok.x[:, 0]), DecodeState(qc.advance(), last), decisions
