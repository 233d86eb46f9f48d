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
"""

from __future__ import annotations

import dataclasses

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EvictingCache:
    """A KVCache of at most `rule.budget` places per layer, and each place's accumulated attention
    (L x [B, S]; H2O's a_j, zeros under StreamingLLM)."""

    kv: KVCache
    score: tuple[jax.Array, ...]
    rule: Eviction = dataclasses.field(metadata=dict(static=True))

    def positions(self):
        return self.kv.positions()

    def advance(self) -> EvictingCache:
        return dataclasses.replace(self, kv=self.kv.advance())

    def keep_rank(self, layer: int, score):
        """How strongly the rule keeps each place: -inf free, +inf protected, else a_j (h2o) or the
        slot (streaming: older first out).  score [B, S] -> [B, S] float32"""
        kv, rule = self.kv, self.rule
        slot = kv.slot[layer]
        position = slot - kv.start[:, None]
        protected = (position < rule.n_sink) | (slot >= kv.index - rule.window)
        rank = score if rule.policy == "h2o" else slot.astype(jnp.float32)
        return jnp.where(slot == EMPTY, -jnp.inf, jnp.where(protected, jnp.inf, rank))

    def attend(self, layer: int, q, k, v, key_mask=None, key_bias=None, rule=PLAIN):
        """`KVCache.attend`, the new token in a free place or in the victim's (rule: the layer's attention rule)."""
        kv, score = self.kv, self.score[layer]
        full = kv.fill[layer] >= kv.length(layer)
        place = jnp.where(full, jnp.argmin(self.keep_rank(layer, score), axis=-1), kv.fill[layer]).astype(jnp.int32)
        kv = kv.write(layer, k, v, place)
        o = kv.attention(layer, q, key_mask, key_bias, rule)
        if self.rule.policy == "h2o":
            mine = jnp.arange(score.shape[1])[None, :] == place[:, None]
            q_slot = jnp.broadcast_to(kv.index, (q.shape[0], 1))
            got = received(q, kv.k[layer], q_slot, kv.slot[layer], jnp.ones(q.shape[:2], bool))
            score = jnp.where(mine, 0.0, score) + got
        scores = tuple(score if i == layer else s for i, s in enumerate(self.score))
        return EvictingCache(kv, scores, self.rule), o


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
