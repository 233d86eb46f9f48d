"""The QuickSilver forward pass over full windows: the reference semantics, masked, static shapes.

Every token's state is carried through the layers with its decisions:

    active_t   runs the next layer             alive_t   not retired by fusion
    halt_t     layer after which it stopped     size_t    tokens its state stands for (fusion)
    bits_t     weight width from layer l_q up (Matryoshka quantization)

Which tokens' logits are needed (`needed`) matters for fusion: a token retired by fusion whose own
prediction is needed keeps computing its own state above the fusion layer, seen by nobody but itself,
exactly as it ran in decoding before its successor existed (its prediction cannot wait for, or depend
on, the next token). Only retired tokens whose predictions nobody needs stop there.

Layer l runs the block on every row, and rows that are not active keep their state (masked
computation: the reference the compacted fast path must reproduce). Keys follow `kvskip`, fusion
adds log(size) to a group's key score. After layer l the halting rule, then fusion, update the
decisions. Which tokens a mechanism may touch (`eligible`) is the caller's: the scope.

Per layer the pass also returns what was executed (tokens computing, (query, key) pairs, entropy
checks, propagated K/V, skipped K/V writes), which `accounting` turns into FLOPs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from qsjax.layers import attend, attend_causal, causal_mask
from qsjax.model import block
from qsjax.quicksilver import fusion, halting, kvskip
from qsjax.quicksilver.compaction import compaction_buckets, on_rows
from qsjax.quicksilver.config import QuickSilverConfig
from qsjax.quicksilver.matryoshka import choose_bits
from qsjax.rope import rope_angles


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tokens:
    """Per-token state and decisions, [B, T] each (x is [B, T, D])."""

    x: jax.Array
    active: jax.Array  # bool
    alive: jax.Array  # bool
    halt: jax.Array  # int32, n_layers when the token never stopped
    fused: jax.Array  # bool: retired by fusion (at layer `halt`)
    absorbed: jax.Array  # bool: has absorbed its predecessor
    size: jax.Array  # float32
    bits: jax.Array  # int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FusionView:
    """What a token's successor needs to decide fusion with it at one layer, [B] each (x [B, D]):
    its state after the layer (before fusion), its size then, whether it could be absorbed there,
    and whether it was itself a candidate to absorb its own predecessor there."""

    x: jax.Array
    size: jax.Array
    absorbable: jax.Array
    candidate: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
    """What one layer executed, per row [B] (int32)."""

    computing: jax.Array  # tokens that ran the layer
    pairs: jax.Array  # (query, key) pairs attended by those tokens
    entropy_checks: jax.Array  # LM-head projections for the halting entropy test
    propagated: jax.Array  # halted tokens whose K/V were projected (propagate mode)
    kv_skipped: jax.Array  # real tokens whose K/V were not written
    selection_pairs: jax.Array  # (query, key) scores of importance selection


def entropy_of_rows(module, x, rows):
    """Entropy (bits) of the next-token distribution of the selected rows, compacted.  -> [B, T]"""
    B, T, D = x.shape
    flat = on_rows(lambda h: halting.entropy_bits(module.logits(h)), rows.reshape(-1), jnp.zeros(B * T, jnp.float32),
                   x.reshape(B * T, D))
    return flat.reshape(B, T)


def halting_decision(qs: QuickSilverConfig, module, layer, x_new, x_old, can, q, k, visible, eligible, positions):
    """Tokens that halt after `layer`, and the entropy checks and selection scores it took."""
    zeros = jnp.zeros(can.shape, bool)
    n_checks = jnp.zeros(can.shape[0], jnp.int32)
    n_select = jnp.zeros(can.shape[0], jnp.int32)
    if qs.halt == "drift":
        passed = can & (layer >= qs.halt_min_layer)
        if qs.halt_drift is not None:
            passed &= halting.drift(x_new, x_old, qs.drift_relative) < qs.halt_drift
        if qs.halt_entropy is None:
            return passed, n_checks, n_select
        n_checks = passed.sum(-1).astype(jnp.int32)
        return passed & (entropy_of_rows(module, x_new, passed) < qs.halt_entropy), n_checks, n_select
    if qs.halt == "cutoff":
        return can & (layer == qs.halt_cutoff_layer), n_checks, n_select
    if qs.halt == "select":
        def select():
            if qs.select_signal == "recency":
                score = positions.astype(jnp.float32)
            else:
                voters = halting.last_n(eligible, qs.select_queries)
                score = halting.attention_received(q, k, voters, visible)
            return can & ~halting.select_keep(score, can, qs.keep_top_k)

        at_c = layer == qs.halt_cutoff_layer
        if qs.select_signal == "attention":
            n_select = jnp.where(at_c, jnp.minimum(eligible.sum(-1), qs.select_queries) * can.shape[1], 0).astype(jnp.int32)
        return jax.lax.cond(at_c, select, lambda: zeros), n_checks, n_select
    return zeros, n_checks, n_select


def fuse_step(qs: QuickSilverConfig, layer, tok: Tokens, can_be_absorbed, needed):
    """Contextual Token Fusion after `layer`: t absorbs t-1 (see `fusion`).  -> Tokens, candidates [B, T]"""
    can_absorb = can_be_absorbed & ~tok.absorbed & (layer >= qs.halt_min_layer)
    prev_x = fusion.shift_right(tok.x, 0)
    cand = fusion.candidates(tok.x, prev_x, can_absorb, fusion.shift_right(can_be_absorbed, False), qs.fuse_threshold)
    fuse = cand & ~fusion.shift_right(cand, False)
    merged, size = fusion.merge(tok.x, prev_x, tok.size, fusion.shift_right(tok.size, 1.0))
    retired = jnp.concatenate([fuse[:, 1:], jnp.zeros_like(fuse[:, :1])], axis=1)  # t-1 of each fused t
    stops = retired & ~needed  # a retired token whose prediction is needed computes on, for itself
    tok = dataclasses.replace(
        tok,
        x=jnp.where(fuse[..., None], merged, tok.x),
        size=jnp.where(fuse, size, tok.size),
        absorbed=tok.absorbed | fuse,
        active=tok.active & ~stops,
        alive=tok.alive & ~retired,
        fused=tok.fused | retired,
        halt=jnp.where(stops, layer, tok.halt),
    )
    return tok, cand


def attention_mask(causal, visible, computing):
    """Keys each query attends to: the causally earlier visible ones, and always its own key (a token
    retired by fusion that computes on for its own prediction is invisible to everyone else).
    causal [B, T, T], visible and computing [B, T]  ->  [B, T, T]"""
    own = jnp.eye(causal.shape[-1], dtype=bool)[None] & computing[:, :, None]
    return causal & (visible[:, None, :] | own)


def masked_block(blk, tok: Tokens, computing, visible, bias, halted, mode, ctx):
    """The reference: the block runs on every row; rows not computing keep their state.
    -> x [B, T, D], q [B, T, H, Dh], k and v [B, T, K, Dh]"""
    cos, sin, causal = ctx[:3]
    q, k, v = blk.qkv(tok.x, cos, sin, tok.bits)
    k, v = kvskip.zero_halted(k, v, halted, mode)
    mask = attention_mask(causal, visible, computing)
    x_new = tok.x + blk.attn_out(attend_causal(q, k, v, mask, bias[:, None, :]), tok.bits)
    x_new = x_new + blk.mlp(x_new, tok.bits)
    return jnp.where(computing[..., None], x_new, tok.x), q, k, v


def compacted_block(blk, tok: Tokens, computing, visible, bias, halted, mode, ctx, buckets):
    """The fast path: only the computing rows run the block, gathered per sequence (in slot order)
    into the smallest bucket that holds them (`lax.switch` on one scalar) and scattered back.

    Under `mask` every visible key belongs to a computing row, so keys and values are projected for
    the gathered rows only and attention runs among them, by causal query blocks in gathered order
    (keys/values of rows that did not compute come back zero: nobody may attend to them). Under
    `propagate` halted rows' keys/values are needed too: they are projected for every row (two
    narrow projections) and the gathered queries attend over all of them.
    Same results as `masked_block` (q is not returned: None)."""
    cos, sin, causal = ctx[:3]
    B, T = computing.shape
    own_rows = mode == "mask"
    k_all, v_all = (None, None) if own_rows else blk.kv(tok.x, cos, sin, tok.bits)

    def full(x):  # the full bucket: the plain window pass, nothing gathered
        q, k, v = blk.qkv(x, cos, sin, tok.bits) if own_rows else (blk.q(x, cos, sin, tok.bits), k_all, v_all)
        mask = attention_mask(causal, visible, computing)
        x_new = x + blk.attn_out(attend_causal(q, k, v, mask, bias[:, None, :]), tok.bits)
        return jnp.where(computing[..., None], x_new + blk.mlp(x_new, tok.bits), x), k, v

    def gathered(n):
        def branch(x):
            idx = jax.vmap(lambda m: jnp.nonzero(m, size=n, fill_value=T)[0])(computing)  # [B, n] ascending
            take = lambda a: jnp.take_along_axis(a, jnp.minimum(idx, T - 1).reshape(B, n, *([1] * (a.ndim - 2))), axis=1)
            rows = jnp.arange(B)[:, None]
            xa, bits = take(x), take(tok.bits)
            if own_rows:
                q, k, v = blk.qkv(xa, take(cos), take(sin), bits)  # [B, n, H or K, Dh]
                own = jnp.eye(n, dtype=bool)[None]  # its own key (see `attention_mask`)
                mask = (idx[:, None, :] <= idx[:, :, None]) & (take(visible)[:, None, :] | own)  # [B, n, n]
                o = attend_causal(q, k, v, mask, take(bias)[:, None, :])
                scatter = lambda a: jnp.zeros((B, T, *a.shape[2:]), a.dtype).at[rows, idx].set(a, mode="drop")
                k, v = scatter(k), scatter(v)
            else:
                q = blk.q(xa, take(cos), take(sin), bits)
                own = jnp.arange(T)[None, None, :] == idx[:, :, None]
                mask = (jnp.arange(T)[None, None, :] <= idx[:, :, None]) & (visible[:, None, :] | own)  # [B, n, T]
                o = attend(q, k_all, v_all, mask, bias[:, None, :])
                k, v = k_all, v_all
            xa = xa + blk.attn_out(o, bits)
            xa = xa + blk.mlp(xa, bits)
            return x.at[rows, idx].set(xa, mode="drop"), k, v

        return branch

    index = jnp.searchsorted(jnp.asarray(buckets), computing.sum(-1).max())
    x, k, v = jax.lax.switch(index, [full if n == T else gathered(n) for n in buckets], tok.x)
    return x, None, k, v


def layer_step(qs: QuickSilverConfig, module, blk, layer, tok: Tokens, ctx, buckets=None):
    """Run block `layer` (1-based) on the window and update the decisions. With `buckets`, only the
    computing rows run (bucketed compaction); without, every row runs and is masked (reference).

    -> new Tokens, LayerStats, this layer's cache entries (k, v [B, T, K, Dh], visible [B, T],
    log-size bias [B, T]), and the last position's FusionView (what a next token decoded after the
    window needs)."""
    cos, sin, causal, valid, eligible, positions, needed = ctx
    computing = tok.active
    halted = tok.alive & ~tok.active
    visible = tok.alive & kvskip.visible_keys(qs.kv_skip, layer, computing, halted, tok.halt, valid, qs.kv_propagate_span)
    bias = jnp.where(visible | computing, jnp.log(tok.size), 0.0)
    if buckets is None:
        x, q, k, v = masked_block(blk, tok, computing, visible, bias, halted, qs.kv_skip, ctx)
    else:
        x, q, k, v = compacted_block(blk, tok, computing, visible, bias, halted, qs.kv_skip, ctx, buckets)
        if qs.halt == "select" and qs.select_signal == "attention":
            q = blk.q(tok.x, cos, sin, tok.bits)  # the voters' queries (only their rows matter)
    writes = kvskip.writes_kv(qs.kv_skip, computing, halted, tok.halt, layer, qs.kv_propagate_span)

    can = eligible & computing & (layer < module.cfg.n_layers)  # nothing to save after the last layer
    halt_now, n_checks, n_select = halting_decision(qs, module, layer, x, tok.x, can, q, k, visible, eligible, positions)
    tok = dataclasses.replace(tok, x=x, active=tok.active & ~halt_now, halt=jnp.where(halt_now, layer, tok.halt))
    view = FusionView(tok.x[:, -1], tok.size[:, -1], (can & ~halt_now)[:, -1], jnp.zeros_like(can[:, -1]))
    if qs.fuse_threshold is not None:
        tok, cand = fuse_step(qs, layer, tok, can & ~halt_now, needed)
        view = dataclasses.replace(view, candidate=cand[:, -1])
    stats = LayerStats(
        computing=computing.sum(-1).astype(jnp.int32),
        pairs=(attention_mask(causal, visible, computing) & computing[:, :, None]).sum((-1, -2)).astype(jnp.int32),
        entropy_checks=n_checks,
        propagated=(writes & ~computing).sum(-1).astype(jnp.int32),
        kv_skipped=(valid & ~writes).sum(-1).astype(jnp.int32),
        selection_pairs=n_select,
    )
    return tok, stats, (k, v, visible, bias), view


def first_decision_layer(qs: QuickSilverConfig, n_layers: int) -> int:
    """The first layer whose step can take or apply a decision (halting and fusion after layers
    >= l_min, cut-off and selection after layer c, Matryoshka widths from l_q). Every layer below it
    runs the plain block for every real token."""
    layers = [n_layers]
    if qs.halt == "drift" or qs.fuse_threshold is not None:
        layers.append(qs.halt_min_layer)
    if qs.halt in ("cutoff", "select"):
        layers.append(qs.halt_cutoff_layer)
    if qs.amq_layer is not None:
        layers.append(qs.amq_layer)
    return min(layers)


def segments(qs: QuickSilverConfig, n_layers: int, first: int = 0) -> list[tuple[int, int]]:
    """Layer ranges [a, b) from `first` on that share one weight format (split at l_q)."""
    cuts = [first, n_layers]
    if qs.amq_layer is not None and qs.amq_layer - 1 > first:
        cuts.insert(1, qs.amq_layer - 1)
    return list(zip(cuts, cuts[1:]))


def scan_layers(module, first: int, last: int, step, carry):
    """`lax.scan` of step(carry, block, layer) over blocks first..last-1 (layer = 1-based number),
    their weights stacked inside jit (they share one structure)."""
    blocks = [module.blocks[i] for i in range(first, last)]
    graphdef = nnx.graphdef(blocks[0])
    stacked = jax.tree.map(lambda *w: jnp.stack(w), *[nnx.state(b) for b in blocks])
    return jax.lax.scan(lambda c, xs: step(c, nnx.merge(graphdef, xs[0]), xs[1]), carry,
                        (stacked, jnp.arange(first + 1, last + 1)))


def run_segment(qs, module, first: int, last: int, tok: Tokens, ctx, buckets=None):
    """Layers first+1..last through `layer_step`."""

    def step(tok, blk, layer):
        tok, stats, cache, view = layer_step(qs, module, blk, layer, tok, ctx, buckets)
        return tok, (stats, cache, view)

    return scan_layers(module, first, last, step, tok)


def dense_layers(module, last: int, tok: Tokens, ctx):
    """Layers 1..last, below the first decision: the plain block on every real token (the fast
    path's shortcut; the stats, cache entries and views are what `layer_step` would return)."""
    cos, sin, causal, valid, eligible, positions, needed = ctx
    mask = causal & valid[:, None, :]
    zeros = jnp.zeros(valid.shape[0], jnp.int32)
    stats = LayerStats(computing=valid.sum(-1).astype(jnp.int32), pairs=(mask & valid[:, :, None]).sum((-1, -2)).astype(jnp.int32),
                       entropy_checks=zeros, propagated=zeros, kv_skipped=zeros, selection_pairs=zeros)
    absorbable = (eligible & valid)[:, -1]  # every layer here is below the last one

    def step(x, blk, layer):
        x_new, (k, v) = block(blk, x, cos, sin, mask)
        x_new = jnp.where(valid[..., None], x_new, x)
        view = FusionView(x_new[:, -1], tok.size[:, -1], absorbable, jnp.zeros_like(absorbable))
        return x_new, (stats, (k, v, valid, jnp.zeros(valid.shape, jnp.float32)), view)

    x, out = scan_layers(module, 0, last, step, tok.x)
    return dataclasses.replace(tok, x=x), out


def dense_prefix(qs: QuickSilverConfig, n_layers: int) -> int:
    """How many layers the fast path runs as plain blocks (none for the masked reference)."""
    return first_decision_layer(qs, n_layers) - 1 if qs.compact else 0


def quicksilver_window(qs: QuickSilverConfig, module, tokens, positions, valid, eligible, needed):
    """QuickSilver forward over causal windows.

    tokens, positions [B, T]; valid [B, T]: real tokens (not padding, left or right);
    eligible [B, T]: tokens the mechanisms may touch (padding and the first n_sink positions are
    removed here); needed [B, T]: tokens whose own logits will be read (see the module docstring).
    With `qs.compact`, layers below the first decision run as plain blocks and the others only on
    the computing rows (bucketed compaction; above the first decision the `zero` K/V mode runs
    masked: its zero keys need every row).

    -> final states x [B, T, D] (a halted token's frozen state), Tokens (decisions), LayerStats
    stacked [L, B], cache entries stacked [L, ...], AMQ entropy checks [B], and the last position's
    FusionView per layer [L, B, ...]."""
    B, T = tokens.shape
    L = module.cfg.n_layers
    eligible = eligible & valid & (positions >= qs.n_sink)
    cos, sin = rope_angles(module.cfg, positions)
    causal = causal_mask(jnp.arange(T), jnp.arange(T), jnp.ones((B, T), bool))
    ctx = (cos, sin, causal, valid, eligible, positions, needed)
    x = module.embed(tokens, positions)
    tok = Tokens(
        x=x, active=valid, alive=valid, halt=jnp.full((B, T), L, jnp.int32),
        fused=jnp.zeros((B, T), bool), absorbed=jnp.zeros((B, T), bool), size=jnp.ones((B, T), jnp.float32),
        bits=jnp.full((B, T), 8, jnp.int32),
    )
    outs, amq_checks = [], jnp.zeros(B, jnp.int32)
    buckets = compaction_buckets(T) if qs.compact and qs.kv_skip != "zero" else None
    start = dense_prefix(qs, L)
    if start > 0:
        tok, out = dense_layers(module, start, tok, ctx)
        outs.append(out)
    for first, last in segments(qs, L, start):
        if qs.amq_layer is not None and first == qs.amq_layer - 1:
            tok = dataclasses.replace(tok, bits=amq_bits(qs, module, tok.x, eligible))
            amq_checks = eligible.sum(-1).astype(jnp.int32)
        tok, out = run_segment(qs, module, first, last, tok, ctx, buckets)
        outs.append(out)
    stats, cache, views = jax.tree.map(lambda *a: jnp.concatenate(a), *outs)
    return tok.x, tok, stats, cache, amq_checks, views


def amq_bits(qs: QuickSilverConfig, module, x, eligible):
    """Each eligible token's weight width from its entropy on entering layer l_q (others keep 8).
    The entropy's LM-head projection runs on the eligible rows only.  x [B, T, D] -> [B, T] int32"""
    h = entropy_of_rows(module, x, eligible)
    return jnp.where(eligible, choose_bits(h, qs.amq_low, qs.amq_high), 8)
