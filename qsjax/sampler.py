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


def generate(model, tokens, start, rng, knobs, *, max_new: int, cache_length: int, sampling: Sampling,
             eos_ids: tuple[int, ...], pad_id: int, on_token=None, prefill_fn=dense_prefill, decode_fn=decode_step):
    """Prefill a left-padded batch, then decode up to `max_new` tokens per row.

    tokens [B, T], start [B]; knobs = (temperature, top_p) as arrays (changing them does not
    recompile; top_k is static).  Returns new tokens [B, max_new] (pad_id after a row's EOS), the count
    generated, and what `prefill_fn(model, tokens, start, cache_length) -> (logits, cache, extra)`
    reported (QuickSilver's prompt statistics; None for the dense prefill).
    `decode_fn(model, cache, tokens [B]) -> (logits, cache)` continues from what the prefill left
    (QuickSilver under scope=all carries more than the cache: its own decode step).
    `on_token(step, tokens [B])`, if given, is called from inside the loop as each step's tokens
    are ready (streaming)."""
    B = tokens.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def emit(step, logits, done, out, rng):
        """Pick this step's tokens, record them, and mark rows that produced an EOS as done."""
        rng, key = jax.random.split(rng)
        tok = jnp.where(done, pad_id, next_token(logits, key, sampling, *knobs))
        return tok, out.at[:, step].set(tok), done | jnp.isin(tok, eos), rng

    logits, cache, extra = prefill_fn(model, tokens, start, cache_length)
    out = jnp.full((B, max_new), pad_id, jnp.int32)
    tok, out, done, rng = emit(0, logits, jnp.zeros(B, bool), out, rng)
    if on_token is not None:
        io_callback(on_token, None, jnp.int32(0), tok, ordered=True)

    def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, tok, cache, done, out, rng = carry
        logits, cache = decode_fn(model, cache, tok)
        tok, out, done, rng = emit(step, logits, done, out, rng)
        if on_token is not None:
            io_callback(on_token, None, step, tok, ordered=True)
        return step + 1, tok, cache, done, out, rng

    step, _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, cache, done, out, rng))
    return out, step, extra
