"""The speculative decode loop: one `lax.while_loop` inside the compiled decode program, static shapes.

Each step, every row that is still generating either
  - verifies: its last token x_0 and up to K drafts go through the model in one pass of K + 1 tokens
    (`dense.model.run_step`, through the same cache), and it emits the a + 1 tokens the verdict gives
    (`acceptance.py`): the a accepted drafts and the model's own next token; or
  - runs a plain step: x_0 alone, one new token, as plain decoding does.
Which of the two (for the whole batch) follows `adapt.Pace`: plain steps run in a loop of their own
while it says drafting does not pay (as plain decoding's do: no branch per step, which would cost
each step a copy of the cache on XLA:CPU), and a verify pass follows when it says it does. Rows accept different counts, so each
row's cache grows by its own amount: row b's next token sits `lead[b]` = count[b] - 1 slots (its new
tokens but the last, which is not cached yet) after the prefill's
`index`; entries of rejected drafts stay where they were written, above every later query of the row
until they are overwritten (the cache's causal rule hides them: nothing to roll back but `lead`).
An evicting cache (`kvpolicy.eviction`) has evicted for every token of a pass, so it lets in only
the tokens kept (`commit`): each token sees the cache plain decoding with eviction would show it.
A row stops at an end token or at `max_new` tokens, as in plain decoding; the text so far (prompt and
generated tokens) is what prompt lookup searches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from qsjax.dense.kvcache import KVCache
from qsjax.dense.model import Sublayers, run_step
from qsjax.dense.sampler import Decoding, LoopState, StepRecord, next_token
from qsjax.kvpolicy.eviction import EvictingCache
from qsjax.speculative.acceptance import verdict
from qsjax.speculative.adapt import Pace
from qsjax.speculative.drafting import self_drafts
from qsjax.speculative.lookup import lookup as find_drafts
from qsjax.speculative.settings import Speculation


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tally:
    """What speculation did: drafts verified and accepted and the passes each row was still generating
    in, per row [B]; verify passes and loop steps []."""

    drafted: jax.Array
    accepted: jax.Array
    row_steps: jax.Array
    verifies: jax.Array
    steps: jax.Array

    def to_json(self, spec: Speculation, cfg, new_tokens: int) -> dict:
        """The report's `speculation`: the settings, drafts verified and accepted, passes through the
        model (`steps`, `verify_steps` of them verifying; `row_steps`: summed over the rows still
        generating) and the tokens they delivered (each row's new tokens after its first, which the
        prefill makes) per row step; `can_pay`: false when the drafter cannot pay on this model
        (`Speculation.can_pay`), and the loop decoded plainly."""
        drafted, accepted, row_steps = int(self.drafted.sum()), int(self.accepted.sum()), int(self.row_steps.sum())
        return {**spec.to_json(), "can_pay": spec.can_pay(cfg), "drafted": drafted, "accepted": accepted,
                "acceptance_rate": accepted / drafted if drafted else None, "verify_steps": int(self.verifies),
                "steps": int(self.steps), "row_steps": row_steps, "tokens": new_tokens,
                "mean_tokens_per_step": new_tokens / row_steps if row_steps else None}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecState:
    """The loop's carry: tokens emitted per row `count` [B], each row's last token [B] (not yet cached),
    the cache (row b's next entry `lead` = count - 1 slots after the prompt's), which rows are done
    [B], the text [B, T + max_new] (the left-padded
    prompt, then the new tokens), the random key, the pace and the tally."""

    count: jax.Array
    token: jax.Array
    cache: object
    done: jax.Array
    text: jax.Array
    rng: jax.Array
    pace: Pace
    tally: Tally

    @property
    def lead(self):
        """[B] the slots each row has cached since the prompt: its new tokens but the last."""
        return self.count - 1


def run(module, cache, tokens, lead, skip: Sublayers = Sublayers()):
    """`run_step` through any cache a prompt leaves for decoding (dense, evicting, or QuickSilver's
    masked or compacted one, whose mask and score bias show every generated place); `commit` then
    keeps what the verdict accepts.  -> logits [B, T, V], cache"""
    if isinstance(cache, (KVCache, EvictingCache)):
        return run_step(module, cache, tokens, lead, skip=skip)
    logits, kv = run_step(module, cache.kv, tokens, lead, getattr(cache, "visible", None), cache.bias, skip)
    return logits, dataclasses.replace(cache, kv=kv)


def commit(cache, emit):
    """The cache after a run whose first emit[b] tokens row b keeps (its last token and the drafts
    accepted; the model's next token is not cached yet). A dense or QuickSilver cache needs nothing:
    the rest lie above the row's next slot, hidden and later overwritten (`lead`). An evicting cache
    has evicted for every token of the run: it lets in the kept ones only (`EvictingCache.commit`)."""
    return cache.commit(emit) if isinstance(cache, EvictingCache) else cache


def run_kept(module, cache, tokens, lead, skip: Sublayers = Sublayers()):
    """`run` with every token of the run kept (a drafting pass).  -> logits [B, T, V], cache"""
    logits, cache = run(module, cache, tokens, lead, skip)
    return logits, commit(cache, jnp.full(lead.shape, tokens.shape[1], jnp.int32))


def after_drafting(before, drafted):
    """The cache a verify pass starts from after self-drafting passes went from `before` to `drafted`:
    the drafted one where the drafter's entries lie above every row's next slot (dense, QuickSilver:
    the verify pass overwrites them, and the cache is not copied), the one before where drafting
    evicted entries (an evicting cache)."""
    return before if isinstance(before, EvictingCache) else drafted


def open_generated(cache):
    """A QuickSilver masked cache with every slot from `index` on shown and unbiased (the generated
    tokens'); other caches as they are."""
    if not hasattr(cache, "visible"):
        return cache
    after = jnp.arange(cache.visible.shape[2]) >= cache.kv.index  # [S]
    return dataclasses.replace(cache, visible=cache.visible | after, bias=jnp.where(after, 0.0, cache.bias))


def start_state(loop: LoopState, prompt, spec: Speculation, max_new: int, cfg) -> SpecState:
    """The speculative carry after the first new token (`sampler.first_token`'s loop state)."""
    B = prompt.shape[0]
    zeros = jnp.zeros(B, jnp.int32)
    return SpecState(jnp.ones(B, jnp.int32), loop.token, open_generated(loop.cache), loop.done | (max_new <= 1),
                     jnp.concatenate([prompt.astype(jnp.int32), loop.out], axis=1), loop.rng,
                     Pace.start(B, spec.num_tokens, spec.threshold(cfg), spec.method == "lookup"),
                     Tally(zeros, zeros, zeros, jnp.int32(0), jnp.int32(0)))


def speculative_loop(module, loop: LoopState, prompt, start, knobs, d: Decoding, spec: Speculation, on_tokens=None):
    """The new tokens after the first, speculatively.  prompt [B, T] (left-padded), start [B];
    on_tokens(tokens [B, K + 1], n [B]), if given, is called from inside the program with each step's
    tokens, row b's first n[b] of them new (streaming; `d.on_token` is the first token's)
    -> the LoopState plain decoding would end with (the same tokens under greedy decoding), the Tally."""
    B, T = prompt.shape
    K, L = spec.num_tokens, module.cfg.n_layers
    skip = spec.drafter_skip(L)
    can_pay = spec.can_pay(module.cfg)
    lookup = spec.method == "lookup"
    eos = jnp.asarray(d.eos_ids if d.eos_ids else (-1,), jnp.int32)
    places = jnp.arange(T + d.max_new, dtype=jnp.int32)[None, :]

    def verify(s: SpecState, drafts, n, key):
        cache = s.cache
        if not lookup:
            drafts, drafted = self_drafts(run_kept, module, cache, s.token, s.lead, K, skip)
            cache = after_drafting(cache, drafted)
        logits, cache = run(module, cache, jnp.concatenate([s.token[:, None], drafts], axis=1), s.lead)
        v = verdict(logits, drafts, n, key, d.sampling, *knobs)
        return v.accepted, v.tokens, commit(cache, v.accepted + 1)

    def plain(s: SpecState, drafts, n, key):
        logits, cache = run_kept(module, s.cache, s.token[:, None], s.lead)
        tok = next_token(logits[:, 0], key, d.sampling, *knobs)
        return jnp.zeros(B, jnp.int32), jnp.zeros((B, K + 1), jnp.int32).at[:, 0].set(tok), cache

    def drafts_of(s: SpecState):
        """The drafts each row has now: drafts [B, K], n [B] of them (those that could still be emitted)."""
        room = jnp.where(~s.done, jnp.minimum(K, d.max_new - s.count - 1), 0)
        if lookup:
            drafts, n = find_drafts(s.text, start, T + s.count, K, spec.max_ngram)
        else:
            drafts, n = jnp.zeros((B, K), jnp.int32), jnp.full(B, K, jnp.int32)
        return drafts, jnp.minimum(n, room)

    def wants_verify(s: SpecState):
        return s.pace.verifies(drafts_of(s)[1])

    def step(s: SpecState, verifies: bool) -> SpecState:
        """A verify pass (verifies) or a plain step, and what it emits."""
        rng, key = jax.random.split(s.rng)
        live = ~s.done
        drafts, n = drafts_of(s)
        accepted, tokens, cache = (verify if verifies else plain)(s, drafts, n, key)
        accepted = jnp.minimum(accepted, n)
        emit = jnp.where(live, accepted + 1, 0)  # [B] tokens each row emits
        is_eos = jnp.isin(tokens, eos) & (jnp.arange(K + 1)[None, :] < emit[:, None])
        first_eos = jnp.argmax(is_eos, axis=1)
        ended = jnp.any(is_eos, axis=1)
        emit = jnp.where(ended, first_eos + 1, emit)
        if on_tokens is not None:
            io_callback(on_tokens, None, tokens, emit, ordered=True)
        at = places - (T + s.count)[:, None]  # [B, T + max_new]: index into this step's tokens
        new = jnp.take_along_axis(tokens, jnp.clip(at, 0, K), axis=1)
        text = jnp.where((at >= 0) & (at < emit[:, None]), new, s.text)
        count = s.count + emit
        last = jnp.take_along_axis(tokens, jnp.maximum(emit - 1, 0)[:, None], axis=1)[:, 0]
        drafting = (n > 0) & live
        mean = jnp.sum(jnp.where(drafting, accepted, 0)) / jnp.maximum(1, jnp.sum(drafting))
        tally, verified = s.tally, jnp.asarray(verifies)
        tally = Tally(tally.drafted + jnp.where(drafting & verified, n, 0),
                      tally.accepted + jnp.where(drafting & verified, accepted, 0), tally.row_steps + live,
                      tally.verifies + verified.astype(jnp.int32), tally.steps + 1)
        pace = s.pace.after(verified, mean.astype(jnp.float32), drafts, n, tokens[:, 0], live)
        return SpecState(count, jnp.where(live, last, s.token), cache, s.done | ended | (count >= d.max_new), text,
                         rng, pace, tally)

    def phase(s: SpecState) -> SpecState:
        """Plain steps while drafting does not pay (a loop of its own, as plain decoding's: no branch
        per step), then one verify pass unless every row is done."""
        plain_on = (lambda s: ~jnp.all(s.done) & ~wants_verify(s)) if can_pay else (lambda s: ~jnp.all(s.done))
        s = jax.lax.while_loop(plain_on, lambda s: step(s, False), s)
        if not can_pay:
            return s
        return jax.lax.cond(jnp.all(s.done), lambda s: s, lambda s: step(s, True), s)

    s = jax.lax.while_loop(lambda s: ~jnp.all(s.done), phase, start_state(loop, prompt, spec, d.max_new, module.cfg))
    out = jnp.where(places[:, T:] - T < s.count[:, None], s.text[:, T:], d.pad_id)
    steps = jnp.arange(d.max_new)[None, :]
    record = StepRecord(steps < (s.count - 1)[:, None], loop.record.info)
    return LoopState(jnp.max(s.count), s.token, s.cache, s.done, out, record, s.rng), s.tally
