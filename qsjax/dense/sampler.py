"""Token sampling and the generation loop.

`first_token` prefills a prompt batch and picks each row's first new token; `decode_loop` makes the
rest, a `lax.while_loop` over decode steps (one Python call for every further token); each is meant
to be compiled as one program, so that the time to first token and the decode speed can be timed
apart (`generate` is both in one function).
Sampling follows Hugging Face's order: temperature, then top-k, then top-p (nucleus).
`Sampling` is static (part of the compiled program); temperature and top_p are traced values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from qsjax.dense.model import decode_step, prefill


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick the next token: greedy (argmax) unless `do_sample`."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off


def top_p_filter(logits, top_p):
    """Keep the most likely tokens whose probability reaches top_p (at least one), as Hugging Face
    does: in ascending order, drop tokens while the cumulative probability stays <= 1 - top_p.

    logits [B, N] -> logits [B, N], removed tokens set to -inf."""
    asc = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
    n_drop = jnp.minimum(jnp.sum(cumulative <= 1 - top_p, axis=-1), logits.shape[-1] - 1)  # [B]
    cutoff = jnp.take_along_axis(asc, n_drop[:, None], axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def next_token(logits, rng, sampling: Sampling, temperature, top_p):
    """logits [B, V] -> tokens [B] int32.

    With top-k on, only the k best candidates are sorted and sampled from (`lax.top_k`), which is
    far cheaper than sorting the whole vocabulary at every step."""
    if not sampling.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if sampling.top_k > 0:
        values, ids = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))  # [B, k]
        choice = jax.random.categorical(rng, top_p_filter(values, top_p), axis=-1)
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(rng, top_p_filter(logits, top_p), axis=-1).astype(jnp.int32)


def filtered_logits(logits, sampling: Sampling, temperature, top_p):
    """The logits `next_token` samples from when `sampling.do_sample`: divided by the temperature, the
    tokens outside the top k and the top p set to -inf.  logits [..., V] -> [..., V]
    (speculative sampling needs this distribution itself, not a draw from it)."""
    logits = logits / temperature
    shape = logits.shape
    logits = logits.reshape(-1, shape[-1])
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, min(sampling.top_k, shape[-1]))[0][:, -1:]  # [N, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return top_p_filter(logits, top_p).reshape(shape)


def dense_prefill(model, tokens, start, cache_length):
    logits, cache = prefill(model, tokens, start, cache_length)
    return logits, cache, None


def dense_decode(model, cache, tokens):
    logits, cache = decode_step(model, cache, tokens)
    return logits, cache, None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepRecord:
    """Per new token, [B, max_new] each: whether it went through a decode step while its row was
    still generating (every new token but a row's last, unless that one is its EOS), and what
    `decode_fn` reported for it (QuickSilver's decisions under scope=all; None)."""

    decoded: jax.Array
    info: object


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoopState:
    """The decode loop's carry: the step about to run, each row's last token [B], what decoding
    continues from (a KV cache, or a QuickSilver state), which rows are done [B], the new tokens so
    far [B, max_new], their `StepRecord`, and the random key."""

    step: jax.Array
    token: jax.Array
    cache: object
    done: jax.Array
    out: jax.Array
    record: StepRecord
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class Decoding:
    """What the loop is compiled for: up to `max_new` tokens per row, picked by `sampling`, a row
    ending at any of `eos_ids` (pad_id after it); `on_token(step, tokens [B])`, if given, is called
    from inside the program as each step's tokens are ready (streaming)."""

    max_new: int
    sampling: Sampling
    eos_ids: tuple[int, ...]
    pad_id: int
    on_token: object = None


def emit(d: Decoding, s: LoopState, logits, knobs) -> LoopState:
    """Pick this step's tokens from logits [B, V], record them, and mark rows that produced an EOS as done."""
    rng, key = jax.random.split(s.rng)
    eos = jnp.asarray(d.eos_ids if d.eos_ids else (-1,), jnp.int32)
    tok = jnp.where(s.done, d.pad_id, next_token(logits, key, d.sampling, *knobs))
    if d.on_token is not None:
        io_callback(d.on_token, None, s.step, tok, ordered=True)
    return dataclasses.replace(s, step=s.step + 1, token=tok, out=s.out.at[:, s.step].set(tok),
                               done=s.done | jnp.isin(tok, eos), rng=rng)


def first_token(model, tokens, start, rng, knobs, d: Decoding, *, cache_length: int, prefill_fn=dense_prefill,
                decode_fn=dense_decode):
    """Prefill a left-padded batch and pick each row's first new token.  tokens [B, T], start [B]
    -> the loop state after it, and what `prefill_fn(model, tokens, start, cache_length) ->
    (logits, cache, extra)` reported (QuickSilver's prompt statistics; None for the dense prefill).
    `decode_fn` (only its output's shapes are used here) sizes the `StepRecord`."""
    B = tokens.shape[0]
    logits, cache, extra = prefill_fn(model, tokens, start, cache_length)
    info = jax.eval_shape(decode_fn, model, cache, jnp.zeros(B, jnp.int32))[2]
    record = StepRecord(jnp.zeros((B, d.max_new), bool),
                        jax.tree.map(lambda a: jnp.zeros((B, d.max_new), a.dtype), info))
    first = LoopState(jnp.int32(0), jnp.full(B, d.pad_id, jnp.int32), cache, jnp.zeros(B, bool),
                      jnp.full((B, d.max_new), d.pad_id, jnp.int32), record, rng)
    return emit(d, first, logits, knobs), extra


def decode_loop(model, state: LoopState, knobs, d: Decoding, *, decode_fn=dense_decode) -> LoopState:
    """The rest of the new tokens: one `decode_fn(model, cache, tokens [B]) -> (logits, cache, info)`
    step per token until every row is done or has `max_new` tokens.  (QuickSilver carries more than
    the cache: its own decode step.)  info: [B] arrays per token, or None."""

    def body(s: LoopState) -> LoopState:
        logits, cache, info = decode_fn(model, s.cache, s.token)
        at = lambda r, a: r.at[:, s.step - 1].set(a)  # the token just decoded is new token step - 1
        record = StepRecord(at(s.record.decoded, ~s.done), jax.tree.map(at, s.record.info, info))
        return emit(d, dataclasses.replace(s, cache=cache, record=record), logits, knobs)

    return jax.lax.while_loop(lambda s: (s.step < d.max_new) & ~jnp.all(s.done), body, state)


def generate(model, tokens, start, rng, knobs, *, max_new: int, cache_length: int, sampling: Sampling,
             eos_ids: tuple[int, ...], pad_id: int, on_token=None, prefill_fn=dense_prefill, decode_fn=dense_decode):
    """Prefill a left-padded batch, then decode up to `max_new` tokens per row, in one function
    (`first_token` then `decode_loop`).  tokens [B, T], start [B]; knobs = (temperature, top_p) as
    arrays (changing them does not recompile; top_k is static).  Returns new tokens [B, max_new]
    (pad_id after a row's EOS), the count generated, and what `prefill_fn` reported."""
    d = Decoding(max_new, sampling, eos_ids, pad_id, on_token)
    state, extra = first_token(model, tokens, start, rng, knobs, d, cache_length=cache_length, prefill_fn=prefill_fn,
                               decode_fn=decode_fn)
    state = decode_loop(model, state, knobs, d, decode_fn=decode_fn)
    return state.out, state.step, extra
