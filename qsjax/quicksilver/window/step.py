"""One layer of the QuickSilver pass: run the block for the tokens that compute, then decide.

For each layer l (1-based) and the tokens' state (`state.Tokens`):

    visible_t  = alive_t and (computing_t, or halted with K/V kept by `kvskip`)
    x_t       <- block_l(x_t) for computing tokens (attending to visible keys, each with log(size) added)
    halt after l:  the halting rule on the eligible computing tokens (`halting`; importance
                   selection's score, from the voters' queries only, and its keep rule: `selection`)
    fuse after l:  t absorbs t-1 (`fusion`); a retired token whose prediction is `needed` computes on,
                   for itself, seen by nobody else: exactly as it ran in decoding before its successor
                   existed (its prediction cannot wait for, or depend on, the next token)

The block runs in one of two executions with the same results: `masked_block` (every row runs,
non-computing rows keep their state: the reference) or `compacted_block` (only the computing rows,
gathered into a bucket: the fast path).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from qsjax.dense import blocks
from qsjax.dense.attention import Window
from qsjax.quicksilver.mechanisms import fusion, halting, kvskip, local, selection
from qsjax.quicksilver.window.rows import on_rows
from qsjax.quicksilver.settings import QuickSilverConfig
from qsjax.quicksilver.mechanisms.matryoshka import choose_bits, with_widths
from qsjax.quicksilver.window.state import CacheEntries, Context, FusionView, LayerOut, LayerStats, Tokens


def entropy_of_rows(module, x, rows):
    """Entropy (bits) of the next-token distribution of the selected rows, compacted.  -> [B, T]"""
    B, T, D = x.shape
    flat = on_rows(lambda h: halting.entropy_bits(blocks.lm_logits(module, h)), rows.reshape(-1),
                   jnp.zeros(B * T, jnp.float32), x.reshape(B * T, D))
    return flat.reshape(B, T)


def amq_bits(qs: QuickSilverConfig, module, x, eligible):
    """Each eligible token's weight width from its entropy on entering layer l_q (others keep 8).
    The entropy's LM-head projection runs on the eligible rows only.  x [B, T, D] -> [B, T] int32"""
    h = entropy_of_rows(module, x, eligible)
    return jnp.where(eligible, choose_bits(h, qs.amq_low, qs.amq_high), 8)


def attended_pairs(visible, computing, win=None):
    """(query, key) pairs the computing tokens attend: the visible keys up to their own slot (inside
    their local window, `local`), plus their own key when it is not visible.  [B, T] -> [B] int32"""
    seen = local.seen(visible, win) + ~visible
    return jnp.where(computing, seen, 0).sum(-1).astype(jnp.int32)


def votes(qs: QuickSilverConfig, blk, tok: Tokens, k, visible, ctx: Context, computing):
    """This layer's attention received by every token from the voters (`selection`), their queries
    projected for their rows only.  k [B, T, K, Dh] (this layer's keys) -> [B, T], voters [B] int32"""
    w = ctx.layout
    idx, ok = selection.voters(ctx.eligible, computing, min(qs.select_queries, computing.shape[1]))
    take = lambda a: jnp.take_along_axis(a, idx.reshape(*idx.shape, *([1] * (a.ndim - 2))), axis=1)
    q = blocks.qkv(blk, take(tok.x), take(w.cos), take(w.sin), with_widths(take(tok.bits)))[0]
    score = selection.received(q, k, take(w.slots), w.slots, ok, visible, qs.select_heads, blocks.rule(blk))
    return score, ok.sum(-1).astype(jnp.int32)


def selection_score(qs: QuickSilverConfig, blk, layer, tok: Tokens, k, visible, ctx: Context, computing):
    """The selection score after `layer` [B, T] and the voters that scored here [B]: this layer's
    votes at a selection layer; with select_accumulate, added at every layer up to the last one
    (elsewhere the score is kept).
    tok: the tokens entering the layer; k, visible: its keys and the keys that may be attended."""
    none = jnp.zeros(computing.shape[0], jnp.int32)
    if qs.halt != "select" or qs.select_signal != "attention":
        return tok.score, none
    stages = [c for c, _ in qs.select_stages]
    if qs.select_accumulate:
        scoring = layer <= stages[-1]
    else:
        scoring = functools.reduce(jnp.logical_or, [layer == c for c in stages])

    def scored():
        new, n = votes(qs, blk, tok, k, visible, ctx, computing)
        return (tok.score + new if qs.select_accumulate else new), n

    return jax.lax.cond(scoring, scored, lambda: (tok.score, none))


def halting_decision(qs: QuickSilverConfig, module, layer, x_new, x_old, can, ctx: Context, score=None):
    """Tokens that halt after `layer` and the entropy checks it took [B].

    can [B, T]: the tokens that may halt here; score [B, T]: importance selection's attention score
    (`selection_score`)."""
    zeros = jnp.zeros(can.shape, bool)
    n_checks = jnp.zeros(can.shape[0], jnp.int32)
    if qs.halt == "drift":
        passed = can & (layer >= qs.halt_min_layer)
        if qs.halt_drift is not None:
            passed &= halting.drift(x_new, x_old, qs.drift_relative) < qs.halt_drift
        if qs.halt_entropy is None:
            return passed, n_checks
        n_checks = passed.sum(-1).astype(jnp.int32)
        return passed & (entropy_of_rows(module, x_new, passed) < qs.halt_entropy), n_checks
    if qs.halt == "cutoff":
        return can & (layer == qs.halt_cutoff_layer), n_checks
    if qs.halt == "select":
        at, fraction = False, 0.0
        for c, keep_fraction in qs.select_stages:
            at, fraction = at | (layer == c), jnp.where(layer == c, keep_fraction, fraction)

        def select():
            s = score if qs.select_signal == "attention" else ctx.layout.positions.astype(jnp.float32)
            s = selection.pool(s, can, qs.select_pool, qs.select_pool_kind)
            return can & ~selection.keep(s, can, selection.budget(ctx.eligible, fraction, qs.select_min_keep),
                                           qs.select_recent)

        return jax.lax.cond(at, select, lambda: zeros), n_checks
    return zeros, n_checks


def visible_keys(qs: QuickSilverConfig, layer, tok: Tokens, valid):
    """The keys that may be attended at `layer`: alive, and computing or halted with K/V kept
    (`kvskip`).  valid [B, T] -> [B, T] bool"""
    return tok.alive & kvskip.visible_keys(qs.kv_skip, layer, tok.active, tok.halted, tok.halt, valid,
                                           qs.kv_propagate_span)


def key_bias(tok: Tokens, visible):
    """Each key's score bias: the log of its group's size where it may be attended (a computing
    token's own key included), 0 elsewhere.  [B, T] -> [B, T] float32"""
    return jnp.where(visible | tok.active, jnp.log(tok.size), 0.0)


def may_decide(ctx: Context, tok: Tokens, layer, n_layers: int):
    """The tokens that may halt, or be absorbed, after `layer`: eligible, computing it, and below the
    last layer (nothing to save after it).  tok: the tokens entering the layer.  -> [B, T] bool"""
    return ctx.eligible & tok.active & (layer < n_layers)


def halt_after(tok: Tokens, layer, halt_now) -> Tokens:
    """The tokens halting after `layer` [B, T] stop computing, their halt layer recorded."""
    return dataclasses.replace(tok, active=tok.active & ~halt_now, halt=jnp.where(halt_now, layer, tok.halt))


def last_view(tok: Tokens, absorbable) -> FusionView:
    """The last position's view for its successor (no fusion candidate yet).  absorbable [B, T]"""
    return FusionView(tok.x[:, -1], tok.size[:, -1], absorbable[:, -1], jnp.zeros_like(absorbable[:, -1]))


def fusion_candidates(qs: QuickSilverConfig, layer, tok: Tokens, absorbable, prev: FusionView):
    """Which tokens are candidates to absorb their predecessor after `layer`, and the merged state
    and size if they do.  absorbable [B, T]: may be absorbed here (each token's own); prev: the
    predecessors' views, [B, T] each (x [B, T, D]; `candidate` is not read).
    -> candidates [B, T], merged x [B, T, D], size [B, T]"""
    can_absorb = fusion.can_absorb(absorbable, tok.absorbed, layer, qs.halt_min_layer)
    return fusion.decide(tok.x, tok.size, can_absorb, prev.x, prev.size, prev.absorbable, qs.fuse_threshold)


def absorb(tok: Tokens, fuse, merged, size) -> Tokens:
    """The tokens that fuse [B, T] carry on with the merged state and size."""
    return dataclasses.replace(tok, x=jnp.where(fuse[..., None], merged, tok.x), size=jnp.where(fuse, size, tok.size),
                               absorbed=tok.absorbed | fuse)


def fuse_step(qs: QuickSilverConfig, layer, tok: Tokens, can_be_absorbed, needed):
    """Contextual Token Fusion after `layer` over a window: t absorbs t-1.  -> Tokens, candidates [B, T]"""
    prev = lambda a, fill: fusion.shift_right(a, fill)
    before = FusionView(prev(tok.x, 0), prev(tok.size, 1.0), prev(can_be_absorbed, False), candidate=None)
    cand, merged, size = fusion_candidates(qs, layer, tok, can_be_absorbed, before)
    fuse = fusion.fuses(cand, prev(cand, False))
    retired = jnp.concatenate([fuse[:, 1:], jnp.zeros_like(fuse[:, :1])], axis=1)  # t-1 of each fused t
    stops = retired & ~needed  # a retired token whose prediction is needed computes on, for itself
    tok = dataclasses.replace(
        absorb(tok, fuse, merged, size),
        active=tok.active & ~stops,
        alive=tok.alive & ~retired,
        fused=tok.fused | retired,
        halt=jnp.where(stops, layer, tok.halt),
    )
    return tok, cand


@dataclasses.dataclass(frozen=True)
class BlockInputs:
    """What block l reads over a window: its parameters `blk`; the tokens entering it (the `active`
    ones compute, the others keep their state; Matryoshka widths from `bits`); the window's context
    (its layout and far-context window); the keys that may be attended, visible [B, T], with their
    score bias [B, T]; and the K/V mode for halted tokens (`kvskip`: mask, zero or propagate)."""

    blk: object
    tok: Tokens
    ctx: Context
    visible: jax.Array
    bias: jax.Array
    mode: str


def masked_block(b: BlockInputs, qkv=None):
    """The reference: the block runs on every row; rows not computing keep their state.
    `qkv`: the rows' queries, keys and values if already projected.  -> x [B, T, D], k and v [B, T, K, Dh]"""
    w, tok = b.ctx.layout, b.tok
    linear = with_widths(tok.bits)
    q, k, v = blocks.qkv(b.blk, tok.x, w.cos, w.sin, linear) if qkv is None else qkv
    k, v = kvskip.zero_halted(k, v, tok.halted, b.mode)
    o = blocks.attend(b.blk, q, k, v, w.slots, w.slots, b.visible, b.bias, self_visible=True, window=b.ctx.local)
    x_new = blocks.tail(b.blk, tok.x, o, linear)
    return jnp.where(tok.active[..., None], x_new, tok.x), k, v


def compacted_block(b: BlockInputs, buckets):
    """The fast path: only the computing rows run the block, gathered per sequence (in slot order)
    into the smallest bucket that holds them (`lax.switch` on one scalar) and scattered back.

    Under `mask` every visible key belongs to a computing row, so keys and values are projected for
    the gathered rows only and attention runs among them, in gathered order (keys/values of rows that
    did not compute come back zero: nobody may attend to them). Under `propagate` halted rows'
    keys/values are needed too: q, k, v are projected for every row and the gathered queries attend
    over all keys. Same results as `masked_block` (not for `zero`, whose zero keys need every row).
    -> x, k, v"""
    blk, tok, w, win, visible, bias = b.blk, b.tok, b.ctx.layout, b.ctx.local, b.visible, b.bias
    computing = tok.active
    B, T = computing.shape
    own_rows = b.mode == "mask"
    q_all, k_all, v_all = (None,) * 3 if own_rows else blocks.qkv(blk, tok.x, w.cos, w.sin, with_widths(tok.bits))

    def full(x):  # the full bucket: the plain window pass, nothing gathered
        return masked_block(b, None if own_rows else (q_all, k_all, v_all))

    def gathered(n):
        def branch(x):
            idx = jax.vmap(lambda m: jnp.nonzero(m, size=n, fill_value=T)[0])(computing)  # [B, n] ascending
            take = lambda a: jnp.take_along_axis(a, jnp.minimum(idx, T - 1).reshape(B, n, *([1] * (a.ndim - 2))), axis=1)
            rows = jnp.arange(B)[:, None]
            lin = with_widths(take(tok.bits))
            xa = take(x)
            if own_rows:  # slot T marks an unused place: after every real query, seen by none
                q, k, v = blocks.qkv(blk, xa, take(w.cos), take(w.sin), lin)  # [B, n, H or K, Dh]
                o = blocks.attend(blk, q, k, v, idx, idx, take(visible), take(bias), self_visible=True,
                                  window=None if win is None else Window(take(win.q_from), take(win.k_anchor)))
                scatter = lambda a: jnp.zeros((B, T, *a.shape[2:]), a.dtype).at[rows, idx].set(a, mode="drop")
                k, v = scatter(k), scatter(v)
            else:
                o = blocks.attend(blk, take(q_all), k_all, v_all, idx, w.slots, visible, bias, self_visible=True,
                                  window=None if win is None else Window(take(win.q_from), win.k_anchor))
                k, v = k_all, v_all
            xa = blocks.tail(blk, xa, o, lin)
            return x.at[rows, idx].set(xa, mode="drop"), k, v

        return branch

    index = jnp.searchsorted(jnp.asarray(buckets), computing.sum(-1).max())
    return jax.lax.switch(index, [full if n == T else gathered(n) for n in buckets], tok.x)


def layer_step(qs: QuickSilverConfig, module, blk, layer, tok: Tokens, ctx: Context, buckets=None):
    """Run block `layer` on the window and update the decisions. With `buckets`, only the computing
    rows run (bucketed compaction); without, every row runs and is masked (reference).
    -> new Tokens, LayerOut"""
    w = ctx.layout
    computing = tok.active
    visible = visible_keys(qs, layer, tok, w.valid)
    bias = key_bias(tok, visible)
    writes = kvskip.writes_kv(qs.kv_skip, computing, tok.halted, tok.halt, layer, qs.kv_propagate_span)
    inputs = BlockInputs(blk=blk, tok=tok, ctx=ctx, visible=visible, bias=bias, mode=qs.kv_skip)
    x, k, v = masked_block(inputs) if buckets is None else compacted_block(inputs, buckets)

    score, n_voters = selection_score(qs, blk, layer, tok, k, visible, ctx, computing)
    can = may_decide(ctx, tok, layer, module.cfg.n_layers)
    halt_now, n_checks = halting_decision(qs, module, layer, x, tok.x, can, ctx, score)
    tok = halt_after(dataclasses.replace(tok, x=x, score=score), layer, halt_now)
    view = last_view(tok, can & ~halt_now)
    if qs.fuse_threshold is not None:
        tok, cand = fuse_step(qs, layer, tok, can & ~halt_now, ctx.needed)
        view = dataclasses.replace(view, candidate=cand[:, -1])
    stats = LayerStats(
        computing=computing.sum(-1).astype(jnp.int32),
        pairs=attended_pairs(visible, computing, ctx.local),
        entropy_checks=n_checks,
        propagated=(writes & ~computing).sum(-1).astype(jnp.int32),
        kv_skipped=(w.valid & ~writes).sum(-1).astype(jnp.int32),
        selection_pairs=n_voters * can.shape[1],  # each voter's row of scores: n_q x T
        selection_queries=n_voters,
    )
    return tok, LayerOut(stats, CacheEntries(k, v, visible, bias), view)
