"""The QuickSilver pass over causal windows: embedding, the layers with their decisions, and what
they leave behind.

    x^0 = embed(tokens);   layers 1..p: plain blocks (no decision can act there: p = first decision - 1;
    with select_accumulate they also score the selection voters' attention)
    layers p+1..L: `layer.layer_step` (block, halting, fusion), split at l_q into segments that
    share one weight format; on entering l_q every eligible token picks its Matryoshka width

Each segment is a `lax.scan` over its layers. The reference (`qs.compact=False`) runs every layer
through `layer_step` masked; the fast path (`qs.compact`) runs the plain prefix as dense blocks and
the other layers compacted (above the first decision the `zero` K/V mode runs masked: its zero keys
need every row). Both give the same decisions and logits (tests/test_quicksilver_forward.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qsjax.dense import blocks
from qsjax.dense.model import Layout, block, scan_layers
from qsjax.quicksilver.mechanisms import local
from qsjax.quicksilver.window.rows import compaction_buckets
from qsjax.quicksilver.settings import QuickSilverConfig
from qsjax.quicksilver.window.step import amq_bits, attended_pairs, layer_step, selection_score
from qsjax.quicksilver.window.state import CacheEntries, Context, FusionView, LayerOut, LayerStats, Tokens, WindowResult


def eligible_tokens(qs: QuickSilverConfig, w: Layout, in_scope):
    """The tokens the mechanisms may touch: real, in scope, and not among the first n_sink positions
    (attention sinks are never halted, fused or narrowed).  -> [B, T] bool"""
    return in_scope & w.valid & (w.positions >= qs.n_sink)


def context(qs: QuickSilverConfig, w: Layout, in_scope, needed) -> Context:
    """What every layer of the pass needs: the layout, the eligible tokens, the needed ones, and
    the far context's attention window.  in_scope, needed [B, T]"""
    eligible = eligible_tokens(qs, w, in_scope)
    return Context(w, eligible, needed, local.window(qs, w, eligible))


def first_decision_layer(qs: QuickSilverConfig, n_layers: int) -> int:
    """The first layer whose step can take or apply a decision (halting and fusion after layers
    >= l_min, cut-off and selection after layer c, Matryoshka widths from l_q)."""
    layers = [n_layers]
    if qs.halt == "drift" or qs.fuse_threshold is not None:
        layers.append(qs.halt_min_layer)
    if qs.halt in ("cutoff", "select"):
        layers.append(qs.halt_cutoff_layer)
    if qs.amq_layer is not None:
        layers.append(qs.amq_layer)
    return min(layers)


def dense_prefix(qs: QuickSilverConfig, n_layers: int) -> int:
    """How many layers the fast path runs as plain blocks (none for the masked reference)."""
    return first_decision_layer(qs, n_layers) - 1 if qs.compact else 0


def segments(qs: QuickSilverConfig, n_layers: int, first: int = 0) -> list[tuple[int, int]]:
    """Layer ranges first+1..last (as (first, last) pairs) from `first` on that share one weight
    format: split before l_q."""
    cuts = [first, n_layers]
    if qs.amq_layer is not None and qs.amq_layer - 1 > first:
        cuts.insert(1, qs.amq_layer - 1)
    return list(zip(cuts, cuts[1:]))


def dense_layers(qs: QuickSilverConfig, module, last: int, tok: Tokens, ctx: Context):
    """Layers 1..last, below the first decision: the plain block on every real token, with the
    by-products `layer_step` would return there (and, with select_accumulate, the voters' scores)."""
    w = ctx.layout
    zeros = jnp.zeros(w.valid.shape[0], jnp.int32)
    absorbable = (ctx.eligible & w.valid)[:, -1]  # every layer here is below the last one

    def step(tok, blk, layer):
        x_new, (k, v) = block(blk, tok.x, w, window=ctx.local)
        x_new = jnp.where(w.valid[..., None], x_new, tok.x)
        score, n_voters = selection_score(qs, blk, layer, tok, k, w.valid, ctx, w.valid)
        stats = LayerStats(computing=w.valid.sum(-1).astype(jnp.int32), pairs=attended_pairs(w.valid, w.valid, ctx.local),
                           entropy_checks=zeros, propagated=zeros, kv_skipped=zeros,
                           selection_pairs=n_voters * w.valid.shape[1], selection_queries=n_voters)
        view = FusionView(x_new[:, -1], tok.size[:, -1], absorbable, jnp.zeros_like(absorbable))
        cache = CacheEntries(k, v, w.valid, jnp.zeros(w.valid.shape, jnp.float32))
        return dataclasses.replace(tok, x=x_new, score=score), LayerOut(stats, cache, view)

    return scan_layers(module, 0, last, step, tok)


def quicksilver_window(qs: QuickSilverConfig, module, tokens, w: Layout, in_scope, needed) -> WindowResult:
    """QuickSilver over causal windows.

    tokens [B, T]; w: positions, valid (real tokens; padding left or right), ...;
    in_scope [B, T]: tokens the scope lets the mechanisms touch (padding and sinks are removed here);
    needed [B, T]: tokens whose own logits will be read (see `layer`)."""
    B, T = tokens.shape
    L = module.cfg.n_layers
    ctx = context(qs, w, in_scope, needed)
    tok = Tokens.start(blocks.embed(module, tokens, w.positions), w.valid, L)
    outs, amq_checks = [], jnp.zeros(B, jnp.int32)
    buckets = compaction_buckets(T) if qs.compact and qs.kv_skip != "zero" else None
    start = dense_prefix(qs, L)
    if start > 0:
        tok, out = dense_layers(qs, module, start, tok, ctx)
        outs.append(out)
    for first, last in segments(qs, L, start):
        if qs.amq_layer is not None and first == qs.amq_layer - 1:
            tok = dataclasses.replace(tok, bits=amq_bits(qs, module, tok.x, ctx.eligible))
            amq_checks = ctx.eligible.sum(-1).astype(jnp.int32)
        tok, out = scan_layers(module, first, last,
                               lambda t, blk, layer: layer_step(qs, module, blk, layer, t, ctx, buckets), tok)
        outs.append(out)
    layers = jax.tree.map(lambda *a: jnp.concatenate(a), *outs)
    return WindowResult(tok.x, tok, layers, amq_checks, ctx.eligible)
