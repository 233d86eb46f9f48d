"""Prompt lookup: drafts copied from the text so far, no model (Saxena 2023; transformers'
`prompt_lookup_num_tokens`).

With the row's text t_1..t_m (prompt and generated tokens), for n = N, N-1, ..., 1 (the longest
n-gram first):

    i* = max { i : t_i..t_(i+n-1) = t_(m-n+1)..t_m,  i + n <= m }       (the latest earlier match)
    drafts = t_(i*+n), ..., t_(i*+n+K-1)                                 (at most K, within the text)

i.e. what followed the last time the text's last n tokens appeared. On input-grounded prompts (copy,
extract, summarise, edit code) the continuation often repeats a span of the prompt, and the model
accepts many drafts at once; elsewhere there is no match, nothing is drafted, and the step is a plain
one. transformers takes the earliest match; we take the latest (our choice: in a long text the most
recent occurrence is the likelier continuation), measured in docs/speculative.md.
"""

from __future__ import annotations

import jax.numpy as jnp


def lookup(text, first, end, K: int, max_ngram: int):
    """text [B, M] int32 holding row b's text in places first[b]..end[b]-1 (end [B]: one past its
    last token) -> drafts [B, K] int32, n_drafts [B] int32 (0: no match)."""
    B, M = text.shape
    places = jnp.arange(M, dtype=jnp.int32)[None, :]  # [1, M]
    drafts, count = jnp.zeros((B, K), jnp.int32), jnp.zeros(B, jnp.int32)
    for n in range(max_ngram, 0, -1):  # a longer match wins: fill only rows without one yet
        match = (places >= first[:, None]) & (places + n < end[:, None])  # room for a continuation
        for j in range(n):
            last_j = jnp.take_along_axis(text, (end - n + j)[:, None], axis=1)  # [B, 1]
            match &= jnp.roll(text, -j, axis=1) == last_j  # text[i + j] == t_(m-n+1+j)
        match &= (end - n >= first)[:, None]  # the text holds n tokens at all
        i = jnp.max(jnp.where(match, places, -1), axis=1)  # [B] the latest match, -1 for none
        found = (i >= 0) & (count == 0)
        begin = i + n  # [B] the continuation's first place
        take = jnp.clip(begin[:, None] + jnp.arange(K)[None, :], 0, M - 1)
        n_found = jnp.clip(end - begin, 0, K)
        drafts = jnp.where(found[:, None], jnp.take_along_axis(text, take, axis=1), drafts)
        count = jnp.where(found, n_found, count)
    return drafts, count
