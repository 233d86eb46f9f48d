"""Token sampling and the generation loop, all inside one compiled function.

The loop is a `lax.while_loop` over decode steps: one Python call generates every new token.
Sampling follows Hugging Face's order: temperature, then top-k, then top-p (nucleus).
`Sampling` is static (part of the compiled program); temperature and top_p are traced values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from qsjax.model import decode_step, prefill


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


def dense_prefill(model, tokens, start, cache_length):
    logits, cache = prefill(model, tokens, start, cache_length)
    return logits, cache, None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoopState:
    """The decode loop's carry: the step about to run, each row's last token [B], what decoding
    continues from (a KV cache, or a QuickSilver state), which rows are done [B], the new tokens so
    far [B, max_new], and the random key."""

    step: jax.Array
    token: jax.Array
    cache: object
    done: jax.Array
    out: jax.Array
    rng: jax.Array


def generate(model, tokens, start, rng, knobs, *, max_new: int, cache_length: int, sampling: Sampling,
             eos_ids: tuple[int, ...], pad_id: int, on_token=None, prefill_fn=dense_prefill, decode_fn=decode_step):
    """Prefill a left-padded batch, then decode up to `max_new` tokens per row (`decode_loop`).

    tokens [B, T], start [B]; knobs = (temperature, top_p) as arrays (changing them does not
    recompile; top_k is static).  Returns new tokens [B, max_new] (pad_id after a row's EOS), the count
    generated, and what `prefill_fn(model, tokens, start, cache_length) -> (logits, cache, extra)`
    reported (QuickSilver's prompt statistics; None for the dense prefill)."""
    logits, cache, extra = prefill_fn(model, tokens, start, cache_length)
    out, steps = decode_loop(model, logits, cache, rng, knobs, max_new=max_new, sampling=sampling, eos_ids=eos_ids,
                             pad_id=pad_id, on_token=on_token, decode_fn=decode_fn)
    return out, steps, extra


def decode_loop(model, logits, cache, rng, knobs, *, max_new: int, sampling: Sampling, eos_ids: tuple[int, ...],
                pad_id: int, on_token=None, decode_fn=decode_step):
    """Up to `max_new` tokens per row from the prompt's last logits [B, V] and what decoding continues
    from.  -> new tokens [B, max_new] (pad_id after a row's EOS), the count generated.
    `decode_fn(model, cache, tokens [B]) -> (logits, cache)` (QuickSilver carries more than the
    cache: its own decode step).  `on_token(step, tokens [B])`, if given, is called from inside the
    loop as each step's tokens are ready (streaming)."""
    B = logits.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def emit(s: LoopState, logits) -> LoopState:
        """Pick this step's tokens, record them, and mark rows that produced an EOS as done."""
        rng, key = jax.random.split(s.rng)
        tok = jnp.where(s.done, pad_id, next_token(logits, key, sampling, *knobs))
        if on_token is not None:
            io_callback(on_token, None, s.step, tok, ordered=True)
        return dataclasses.replace(s, step=s.step + 1, token=tok, out=s.out.at[:, s.step].set(tok),
                                   done=s.done | jnp.isin(tok, eos), rng=rng)

    first = LoopState(jnp.int32(0), jnp.full(B, pad_id, jnp.int32), cache, jnp.zeros(B, bool),
                      jnp.full((B, max_new), pad_id, jnp.int32), rng)
    state = emit(first, logits)

    def body(s: LoopState) -> LoopState:
        logits, cache = decode_fn(model, s.cache, s.token)
        return emit(dataclasses.replace(s, cache=cache), logits)

    state = jax.lax.while_loop(lambda s: (s.step < max_new) & ~jnp.all(s.done), body, state)
    return state.out, state.step
