"""QuickSilver in decode: one new token per row, with the decisions the window pass makes for it.

Under `scope=all` a generated token is eligible like any other, so each step runs it through the
layers as `forward.quicksilver_window` would at its position, attending to the cache:

- halting after each layer (the drift + entropy rule, or the depth cut-off); a halted token's state
  is frozen and its keys/values in the layers above follow `kv_skip` (mask: not visible; zero: zero
  vectors; propagate: projected from the frozen state);
- fusion with the previous token, decided from the previous token's `FusionView` at each layer
  (kept from its own step). On fusion the previous token is retired: its keys/values above that
  layer vanish from the cache. It made its own prediction in its own step, at full depth, before
  this token existed, which is what the window pass reproduces for a token whose logits are needed;
- Matryoshka widths from the entropy on entering layer l_q.

With a batch, only the rows whose token still computes reach a layer's query, attention, output
projection and MLP: they are gathered into the smallest of 1, 2, 4, ... rows that holds them
(`compaction.on_rows`: `lax.switch` on one scalar per layer), and scattered back.

Under `scope=context` generated tokens are never eligible: the plain `model.decode_step` runs them
over the cache the prompt left (halted keys masked, zeroed or propagated; fused groups' bias).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qsjax.kvcache import KVCache
from qsjax.layers import attend
from qsjax.quicksilver import fusion, kvskip
from qsjax.quicksilver.compaction import buckets_for, on_rows
from qsjax.quicksilver.config import QuickSilverConfig
from qsjax.quicksilver.forward import FusionView, Tokens, amq_bits, halting_decision
from qsjax.rope import rope_angles


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The cache (with per-layer visibility and bias) and the last token's fusion view per layer
    ([L, B, ...])."""

    cache: KVCache
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
    cfg = module.cfg
    L = cfg.n_layers
    cache = state.cache
    B = tokens.shape[0]
    i = cache.index
    positions = (i - cache.start)[:, None]  # [B, 1]
    cos, sin = rope_angles(cfg, positions)
    slots = jnp.arange(cache.length)
    k_valid = (slots[None, :] >= cache.start[:, None]) & (slots[None, :] <= i)  # [B, S]
    own = slots[None, :] == i  # [B, S]: the new token's own slot
    eligible = (positions >= qs.n_sink) & (qs.scope == "all")  # [B, 1]
    ones = jnp.ones((B, 1), bool)
    tok = Tokens(
        x=module.embed(tokens[:, None], positions), active=ones, alive=ones, halt=jnp.full((B, 1), L, jnp.int32),
        fused=~ones, absorbed=~ones, size=jnp.ones((B, 1), jnp.float32), bits=jnp.full((B, 1), 8, jnp.int32),
    )
    k_all, v_all, visible, bias = cache.k, cache.v, cache.visible, cache.bias
    views = []
    prev_fused = jnp.zeros(B, bool)
    for li, blk in enumerate(module.blocks):
        layer = li + 1
        if qs.amq_layer is not None and layer == qs.amq_layer:
            tok = dataclasses.replace(tok, bits=amq_bits(qs, module, tok.x, eligible))
        bits = tok.bits if qs.amq_layer is not None and layer >= qs.amq_layer else None
        computing = tok.active
        halted = tok.alive & ~tok.active

        # this layer's cache entry for the new slot, as the window pass leaves it
        vis_new = tok.alive & kvskip.visible_keys(qs.kv_skip, layer, computing, halted, tok.halt, ones,
                                                  qs.kv_propagate_span)
        k, v = kvskip.zero_halted(*blk.kv(tok.x, cos, sin, bits), halted, qs.kv_skip)  # [B, 1, K, Dh]
        k_all = jax.lax.dynamic_update_slice(k_all, k[None], (li, 0, i, 0, 0))
        v_all = jax.lax.dynamic_update_slice(v_all, v[None], (li, 0, i, 0, 0))
        visible = jax.lax.dynamic_update_slice(visible, vis_new.T[:, :, None], (li, 0, i))
        bias = jax.lax.dynamic_update_slice(bias, jnp.where(vis_new | computing, jnp.log(tok.size), 0.0).T[:, :, None],
                                            (li, 0, i))

        def run(x, cos, sin, bits, keys, values, mask, b, blk=blk):
            """The block for the computing rows: [n, 1, D] -> [n, 1, D]."""
            q = blk.q(x, cos, sin, bits)
            x = x + blk.attn_out(attend(q, keys, values, mask[:, None, :], b[:, None, :]), bits)
            return x + blk.mlp(x, bits)

        mask = k_valid & (visible[li] | own)  # [B, S]; the own key is always there for a computing row
        x = on_rows(run, computing[:, 0], tok.x, tok.x, cos, sin, tok.bits if bits is not None else None,
                    k_all[li], v_all[li], mask, bias[li], buckets=buckets_for(B, smallest=1, factor=2))

        can = eligible & computing & (layer < L)
        halt_now, _, _ = halting_decision(qs, module, layer, x, tok.x, can, None, None, None, eligible, positions)
        tok = dataclasses.replace(tok, x=x, active=tok.active & ~halt_now, halt=jnp.where(halt_now, layer, tok.halt))
        absorbable = can & ~halt_now
        view = FusionView(tok.x[:, 0], tok.size[:, 0], absorbable[:, 0], jnp.zeros(B, bool))
        if qs.fuse_threshold is not None:
            prev = jax.tree.map(lambda a: a[li], state.last)
            can_absorb = absorbable & ~tok.absorbed & (layer >= qs.halt_min_layer)
            cand = fusion.candidates(tok.x, prev.x[:, None], can_absorb, prev.absorbable[:, None], qs.fuse_threshold)
            fuse = cand & ~prev.candidate[:, None]  # [B, 1]
            merged, size = fusion.merge(tok.x, prev.x[:, None], tok.size, prev.size[:, None])
            view = dataclasses.replace(view, candidate=cand[:, 0])
            tok = dataclasses.replace(tok, x=jnp.where(fuse[..., None], merged, tok.x), size=jnp.where(fuse, size, tok.size),
                                      absorbed=tok.absorbed | fuse)
            # the previous token is retired: its keys above this layer vanish
            above = (jnp.arange(L) >= layer)[:, None] & fuse[:, 0][None, :]  # [L, B]
            retire = jax.lax.dynamic_slice(visible, (0, 0, i - 1), (L, B, 1)) & ~above[:, :, None]
            visible = jax.lax.dynamic_update_slice(visible, retire, (0, 0, i - 1))
            prev_fused = prev_fused | fuse[:, 0]
        views.append(view)

    cache = dataclasses.replace(cache, k=k_all, v=v_all, visible=visible, bias=bias, index=i + 1)
    last = jax.tree.map(lambda *a: jnp.stack(a), *views)
    new_state = DecodeState(cache, last)
    decisions = StepDecisions(tok.halt[:, 0], tok.bits[:, 0], prev_fused)
    return module.logits(tok.x[:, 0]), new_state, decisions
