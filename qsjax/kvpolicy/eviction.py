"""A KV cache held to a budget during generation: StreamingLLM and H2O eviction.

Each layer holds at most N places per row (the budget). A new token whose layer is full takes the
place of one evicted entry, chosen per row and layer:

    StreamingLLM (Xiao et al., attention sinks):  keep the first n_sink tokens and the latest ones;
        victim = the oldest entry that is not a sink
    H2O (Zhang et al., heavy hitters):  keep the sinks, the `recent` latest tokens and the entries
        that received the most attention:
        a_j    += sum over query heads of softmax_j(q . k_j / sqrt(Dh))  for each new token's query
        victim  = argmin a_j over the entries that are neither sinks nor among the `recent` latest

A free place (left padding) goes first; ties go to the lowest place, so eviction is deterministic.
One victim per row and layer (all heads together): the cache is [B, K, N, Dh] per layer.

After a prompt longer than the budget, each layer keeps the N entries the rule ranks highest
(sinks, then the latest / the heaviest). H2O's prompt scores a_j are the attention key j receives
from the prompt's last `recent` queries (an observation window, as in SnapKV; accumulating over all
T queries would need a second pass over the T x T scores). Keys keep the RoPE rotation of their
original positions and a new token's position counts on from the prompt length (no re-rotation
into cache places), so the sequence must fit the model's context as without eviction. A budget that
holds the prompt and every new token never evicts: the cache is the dense one.

Speculative decoding (`run_attend`, `commit`): a pass of T tokens per row enters each layer token by
token, as T decode steps would, on a copy of the layer; after the verdict `commit` lets in each
row's kept tokens only, replaying them through the same rule on the cache before the pass (same
places, same scores), so every token sees the cache plain decoding with eviction shows it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qsjax.dense import blocks
from qsjax.dense.attention import PLAIN
from qsjax.dense.kvcache import EMPTY, KVCache
from qsjax.dense.model import Layout, block, scan_layers

POLICIES = ("streaming", "h2o")


@dataclasses.dataclass(frozen=True)
class Eviction:
    policy: str  # streaming | h2o
    budget: int  # places per layer and row
    n_sink: int = 4  # first tokens never evicted
    recent: int | None = None  # h2o: latest tokens never evicted (None: half the budget)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"eviction policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy == "streaming" and self.recent is not None:
            raise ValueError("recent is for h2o (streaming keeps the latest tokens that fit after the sinks)")
        if self.n_sink < 0 or self.budget <= self.n_sink + self.window:
            kept = f"n_sink={self.n_sink}" + (f" + recent={self.window}" if self.policy == "h2o" else "")
            raise ValueError(f"budget={self.budget} must exceed {kept} (the tokens never evicted): nothing would be "
                             "left to evict")

    @property
    def window(self) -> int:
        """The latest tokens protected from eviction (streaming: none beyond the age order)."""
        if self.policy == "streaming":
            return 0
        return self.budget // 2 if self.recent is None else self.recent


class Run(NamedTuple):
    """A run of T tokens per row through one layer (speculative decoding), noted for `commit`:
    q [B, T, H, Dh], k, v [B, T, K, Dh], lead [B] (row b's token j has slot index + lead[b] + j)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    lead: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EvictingCache:
    """A KVCache of at most `rule.budget` places per layer, and each place's accumulated attention
    (L x [B, S]; H2O's a_j, zeros under StreamingLLM). `pending`: the last run's tokens per layer
    (None where it skipped the layer) until `commit`; () outside speculative decoding."""

    kv: KVCache
    score: tuple[jax.Array, ...]
    rule: Eviction = dataclasses.field(metadata=dict(static=True))
    pending: tuple = ()

    def positions(self):
        return self.kv.positions()

    def advance(self) -> EvictingCache:
        return dataclasses.replace(self, kv=self.kv.advance())

    def keep_rank(self, layer: int, score):
        """`keep_rank` for the next token (slot `index`).  score [B, S] -> [B, S] float32"""
        index = jnp.broadcast_to(self.kv.index, self.kv.start.shape)
        return keep_rank(self.rule, self.kv.slot[layer], score, self.kv.start, index)

    def admit(self, layer: int, q, k, v, q_slot, free, take=None) -> EvictingCache:
        """One token per row enters layer `layer` (0-based): into place free[b] while the layer has room,
        else into the victim's, then (H2O) every entry gains the attention its query gives it (its own
        entry starts from 0).  q [B, 1, H, Dh], k, v [B, 1, K, Dh], q_slot [B] (its slot), free [B];
        take [B] bool: the rows it enters (None: all; the others stay as they are)."""
        kv, score = self.kv, self.score[layer]
        victim = jnp.argmin(keep_rank(self.rule, kv.slot[layer], score, kv.start, q_slot), axis=-1)
        place = jnp.where(free >= kv.length(layer), victim, free).astype(jnp.int32)
        kv = kv.write(layer, k, v, place, q_slot)
        if self.rule.policy == "h2o":
            mine = jnp.arange(score.shape[1])[None, :] == place[:, None]
            got = received(q, kv.k[layer], q_slot[:, None], kv.slot[layer], jnp.ones(q.shape[:2], bool))
            score = jnp.where(mine, 0.0, score) + got
        if take is not None:  # the other rows keep the layer as it was
            pick = lambda new, old: jnp.where(take.reshape(-1, *(1,) * (new.ndim - 1)), new, old)
            kv = dataclasses.replace(kv, k=replace(kv.k, layer, pick(kv.k[layer], self.kv.k[layer])),
                                     v=replace(kv.v, layer, pick(kv.v[layer], self.kv.v[layer])),
                                     slot=replace(kv.slot, layer, pick(kv.slot[layer], self.kv.slot[layer])))
            score = pick(score, self.score[layer])
        return dataclasses.replace(self, kv=kv, score=replace(self.score, layer, score))

    def attend(self, layer: int, q, k, v, key_mask=None, key_bias=None, rule=PLAIN):
        """`KVCache.attend`, the new token in a free place or in the victim's (rule: the layer's attention rule)."""
        B = q.shape[0]
        q_slot = jnp.broadcast_to(self.kv.index, (B,))
        cache = self.admit(layer, q, k, v, q_slot, jnp.broadcast_to(self.kv.fill[layer], (B,)))
        return cache, cache.kv.attention(layer, q, key_mask, key_bias, rule, q_slot)

    def run_attend(self, layer: int, q, k, v, lead, key_mask=None, key_bias=None, rule=PLAIN):
        """A run of T tokens per row (speculative decoding: a row's last token and its drafts), each
        entering and attending as `attend`'s token would at its slot index + lead[b] + j, one after
        another (a scan over the run, on a copy of the layer). The cache returned is this one with the
        run noted: `commit` lets in the tokens the verdict keeps.  q [B, T, H, Dh], k, v [B, T, K, Dh],
        lead [B]; key_mask, key_bias [B, S_l] or None  -> cache, o [B, T, H, Dh]"""

        def step(one: EvictingCache, x):
            qj, kj, vj, slot, free = x  # [B, H, Dh], [B, K, Dh] x 2, [B], [B]
            one = one.admit(0, qj[:, None], kj[:, None], vj[:, None], slot, free)
            return one, one.kv.attention(0, qj[:, None], key_mask, key_bias, rule, slot)[:, 0]

        _, o = jax.lax.scan(step, self.one_layer(layer), self.tokens(layer, Run(q, k, v, lead)))
        pending = self.pending or (None,) * len(self.score)
        return dataclasses.replace(self, pending=replace(pending, layer, Run(q, k, v, lead))), o.transpose(1, 0, 2, 3)

    def commit(self, emit) -> EvictingCache:
        """The noted run's first emit[b] tokens of row b enter every layer it ran through, as they did in
        the run (its queries, keys and values; the rule is deterministic: the same places, the same
        scores), and the rest leave no trace: the cache plain decoding would hold after them.  emit [B]"""
        cache = dataclasses.replace(self, pending=())
        for layer, run in enumerate(self.pending):
            if run is None:
                continue

            def step(one: EvictingCache, x):
                j, (qj, kj, vj, slot, free) = x
                return one.admit(0, qj[:, None], kj[:, None], vj[:, None], slot, free, j < emit), None

            T = run.q.shape[1]
            one, _ = jax.lax.scan(step, cache.one_layer(layer), (jnp.arange(T), cache.tokens(layer, run)))
            cache = cache.with_layer(layer, one)
        return cache

    def tokens(self, layer: int, run: Run):
        """A run's tokens in order, for a scan: q, k, v [T, B, ...], their slots and free places [T, B]."""
        T = run.q.shape[1]
        slots = self.kv.run_slots(run.lead, T).T  # [T, B]
        free = slots - self.kv.index + self.kv.fill[layer]
        first = lambda x: x.swapaxes(0, 1)
        return first(run.q), first(run.k), first(run.v), slots, free

    def one_layer(self, layer: int) -> EvictingCache:
        """Layer `layer` alone (a one-layer cache, the same rows and slots): what a scan over a run's
        tokens carries, so that it copies and updates only that layer."""
        kv = self.kv
        one = KVCache((kv.k[layer],), (kv.v[layer],), (kv.slot[layer],), kv.start, kv.index, kv.fill[layer][None])
        return EvictingCache(one, (self.score[layer],), self.rule)

    def with_layer(self, layer: int, one: EvictingCache) -> EvictingCache:
        """This cache with layer `layer` taken from a one-layer cache (`one_layer`)."""
        kv = self.kv
        kv = dataclasses.replace(kv, k=replace(kv.k, layer, one.kv.k[0]), v=replace(kv.v, layer, one.kv.v[0]),
                                 slot=replace(kv.slot, layer, one.kv.slot[0]))
        return dataclasses.replace(self, kv=kv, score=replace(self.score, layer, one.score[0]))


def replace(items: tuple, i: int, item) -> tuple:
    """The tuple with its i-th element replaced."""
    return tuple(item if j == i else x for j, x in enumerate(items))


def keep_rank(rule: Eviction, slot, score, start, q_slot):
    """How strongly the rule keeps each place when the token of slot q_slot[b] enters row b: -inf free,
    +inf protected (a sink, or under H2O one of the `window` tokens before it), else a_j (h2o) or the
    slot (streaming: older first out).  slot [B, S] int32, score [B, S], start, q_slot [B] -> [B, S] float32"""
    position = slot - start[:, None]
    protected = (position < rule.n_sink) | (slot >= q_slot[:, None] - rule.window)
    rank = score if rule.policy == "h2o" else slot.astype(jnp.float32)
    return jnp.where(slot == EMPTY, -jnp.inf, jnp.where(protected, jnp.inf, rank))


def received(q, kh, q_slot, k_slot, q_ok):
    """Softmax attention each key receives from the given queries, summed over queries and heads,
    keys visible by the slot rule (k_slot <= q_slot).  q [B, R, H, Dh], kh [B, K, S, Dh],
    q_slot [B, R], k_slot [B, S], q_ok [B, R] (queries that vote)  -> [B, S] float32"""
    B, R, H, Dh = q.shape
    K = kh.shape[1]
    qg = q.reshape(B, R, K, H // K, Dh)  # query head h = k G + g, as in `layers.grouped_scores` (keys heads-major here)
    scores = jnp.einsum("brkgd,bksd->bkgrs", qg, kh, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(Dh))
    seen = k_slot[:, None, :] <= q_slot[:, :, None]  # [B, R, S]
    probs = jax.nn.softmax(jnp.where(seen[:, None, None], scores, -jnp.inf), axis=-1)
    probs = jnp.where(seen[:, None, None] & q_ok[:, None, None, :, None], probs, 0.0)  # no NaN from a blind query
    return probs.sum((1, 2, 3))


def evicting_prefill(model, tokens, start, rule: Eviction, new_tokens: int):
    """A left-padded prompt batch into an evicting cache of min(budget, T + new_tokens) places per layer.
    tokens [B, T], start [B] -> last logits [B, V], EvictingCache"""
    T = tokens.shape[1]
    w = Layout.left_padded(model.cfg, start, T)
    R = min(T, max(rule.window, 1))  # the observation window

    def step(x, blk, _):
        out, (k, v) = block(blk, x, w)
        q, _, _ = blocks.qkv(blk, x[:, -R:], w.cos[:, -R:], w.sin[:, -R:])  # the window's queries again (R tokens)
        k_slot = jnp.where(w.valid, w.slots, EMPTY)  # padding: seen by no query
        return out, (k, v, received(q, k.transpose(0, 2, 1, 3), w.slots[:, -R:], k_slot, w.valid[:, -R:]))

    x, (k, v, score) = scan_layers(model, 0, len(model.blocks), step, blocks.embed(model, tokens, w.positions))
    logits = blocks.lm_logits(model, x[:, -1])
    size = min(rule.budget, T + new_tokens)
    room = [(0, 0), (0, max(size, T) - T)]
    full = EvictingCache(KVCache.from_window(k, v, start, max(size, T)), tuple(jnp.pad(a, room) for a in score), rule)
    return logits, full if size >= T else within_budget(full, size)


def within_budget(cache: EvictingCache, size: int) -> EvictingCache:
    """Keep the `size` places per row and layer that the rule ranks highest, in slot order (full)."""
    kv = cache.kv
    ks, vs, slots, scores = [], [], [], []
    for l in range(len(kv.k)):
        _, top = jax.lax.top_k(cache.keep_rank(l, cache.score[l]), size)
        order = jnp.sort(top, axis=-1)  # [B, size]
        heads = lambda a: jnp.take_along_axis(a, order[:, None, :, None], axis=2)
        ks.append(heads(kv.k[l]))
        vs.append(heads(kv.v[l]))
        slots.append(jnp.take_along_axis(kv.slot[l], order, axis=-1))
        scores.append(jnp.take_along_axis(cache.score[l], order, axis=-1))
    fill = jnp.full(len(kv.k), size, jnp.int32)
    return EvictingCache(KVCache(tuple(ks), tuple(vs), tuple(slots), kv.start, kv.index, fill), tuple(scores), cache.rule)


def add_eviction_args(parser) -> None:
    group = parser.add_argument_group("KV-cache eviction (off unless --kv-budget is given; dense model only; "
                                      "--n-sink sets the sinks)")
    group.add_argument("--kv-budget", type=int, metavar="N", help="keep at most N tokens' keys/values per layer")
    group.add_argument("--kv-evict", choices=POLICIES, help="what to evict: streaming = StreamingLLM (sinks + latest), "
                       "h2o = H2O (sinks + latest + most attended); default streaming")
    group.add_argument("--kv-recent", type=int, metavar="N",
                       help="h2o: latest tokens never evicted (default half the budget)")


def eviction_from_args(args, quicksilver_enabled: bool) -> Eviction | None:
    """The eviction the options ask for (None: off); bad values and combinations are UsageErrors.
    The sinks are QuickSilver's: one flag, --n-sink (qsjax.quicksilver.options), for both."""
    from qsjax.runtime.cli import UsageError

    n_sink = getattr(args, "qs_n_sink", None)

    if args.kv_budget is None:
        given = [f for f, v in (("--kv-evict", args.kv_evict), ("--kv-recent", args.kv_recent)) if v is not None]
        if given:
            raise UsageError(f"{given[0]} needs --kv-budget N (the tokens kept per layer)")
        return None
    if quicksilver_enabled:
        raise UsageError("--kv-budget evicts from the dense model's cache; it does not combine with QuickSilver options")
    for flag, value, low in (("--kv-budget", args.kv_budget, 1), ("--n-sink", n_sink, 0),
                             ("--kv-recent", args.kv_recent, 0)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    try:
        return Eviction(args.kv_evict or "streaming", args.kv_budget, 4 if n_sink is None else n_sink,
                        args.kv_recent)
    except ValueError as e:  # in the flags' words
        words = {"budget=": "--kv-budget ", "n_sink=": "--n-sink ", "recent=": "--kv-recent ",
                 "recent is": "--kv-recent is"}
        message = str(e)
        for field, flag in words.items():
            message = message.replace(field, flag)
        raise UsageError(message) from None
