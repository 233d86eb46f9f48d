"""Attention that never builds a T x T tensor: blockwise, with an online softmax over key blocks.

For query i (slot q_i) and key j (slot k_j), with G = H // K query heads sharing key/value head h // G:

    visible(i, j) = k_j <= q_i  and  (ok_j  or  (self_visible and k_j == q_i))
                    [and  (k_j >= from_i  or  anchor_j)   with a local `Window`]
                    [and  k_j > q_i - W                   with a layer's sliding window W, `Rule`]
    s_ij   = q_i . k_j / sqrt(Dh) [-> c tanh(s_ij / c), `Rule`'s soft-cap] + bias_j   (float32)
    out_i  = sum_{j visible} exp(s_ij - m_i) v_j  /  sum_{j visible} exp(s_ij - m_i),   m_i = max_j s_ij
    out_i  = 0  when no key is visible to query i (a padding query).

Following Rabe & Staats ("Self-attention does not need O(n^2) memory") and FlashAttention, the keys
are visited in blocks of `KEY_BLOCK` while a running max m, running sum l and running output acc are
kept per query, in float32:

    m' = max(m, max_j s_ij),   l' = e^(m - m') l + sum_j e^(s_ij - m'),   acc' = e^(m - m') acc + sum_j e^(s_ij - m') v_j

Queries go by blocks of `QUERY_BLOCK`; for each, the key-block loop stops after the last block whose
smallest slot is <= the query block's largest slot (so a causal window does about half the square),
and a block whose mask is empty is skipped by a `lax.cond`, never computed and discarded. Grouped
heads are handled by viewing the G query heads of a key/value head as extra query rows of one matmul,
so K and V are never repeated. Memory is O(T x block), not O(T x S).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qsjax.dense import layers

# Block sizes measured at SmolLM2's shapes on a 2-core AVX-512 CPU (scripts/bench_attention.py
# --blocks): 256 x 512 was fastest or within noise of it at 2,048-8,192 tokens; 512 x 512 was
# 0.7-0.9x, 128 x 512 0.8-0.9x. A [B, K, G, 256, 512] float32 score block is 4.7 MB (L3-resident).
QUERY_BLOCK = 256
KEY_BLOCK = 512
DIRECT_MAX = 512 * 1024  # T x S up to this: one block, no loop (decode, short prompts)
_NO_Q = jnp.iinfo(jnp.int32).min  # slot of a padding query row: sees nothing
_NO_K = jnp.iinfo(jnp.int32).max  # slot of a padding key row: seen by nothing


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Window:
    """Local attention (a sliding window): query i sees only keys with k_slot >= q_from[i], and the
    anchor keys (e.g. attention sinks) wherever they are.  q_from [B, T] int32, k_anchor [B, S] bool"""

    q_from: jax.Array
    k_anchor: jax.Array


@dataclasses.dataclass(frozen=True)
class Rule:
    """A layer's own attention options, static (a block holds its own, `blocks.rule`): scores
    soft-capped to c tanh(s / c) (Gemma 2), and a sliding window of W slots (query i sees keys with
    k_slot > q_slot[i] - W; Mistral, Gemma's local layers). None: off. Unlike a `Window`, which a
    caller asks for, a Rule is part of the model."""

    softcap: float | None = None
    sliding: int | None = None


PLAIN = Rule()


def attention(q, k, v, q_slot, k_slot, k_ok, bias=None, *, self_visible=False, window=None, rule=PLAIN):
    """q [B, T, H, Dh]; k, v [B, S, K, Dh] (H a multiple of K: grouped heads, G = H // K);
    q_slot [B, T] int32, k_slot [B, S] int32; k_ok [B, S] bool; bias [B, S] float32 or None.
    Query i may attend key j  iff  k_slot[j] <= q_slot[i]  and  (k_ok[j]  or  (self_visible and k_slot[j] == q_slot[i])).
    scores = q.k / sqrt(Dh) + bias[j]; softmax over the visible keys in float32; -> [B, T, H, Dh] in q's dtype.
    A query with no visible key returns zeros. window (a `Window`, or None): besides, query i sees
    only keys with k_slot[j] >= window.q_from[i] or window.k_anchor[j] (a sliding window with sinks).
    rule: the layer's own soft-cap and sliding window (`Rule`).

    Dispatch (static, on shapes, dtype and backend): on GPU, a left-padded causal window without bias
    (checked at run time) goes to `jax.nn.dot_product_attention` (cuDNN flash attention). When
    T x S <= DIRECT_MAX all keys form one block with no loop: measured on a 2-core CPU, that is
    1.3-1.9x faster for decode (T = 1, S = 2,048-8,192), 1.2x at T = S = 256, equal at 512, and 2.1x
    slower at 1,024 (the loops skip the upper triangle). Otherwise the blockwise loops above. Slots
    need not be ascending for correctness; ascending slots (every caller) let the key loop stop early."""
    T, S, Dh = q.shape[1], k.shape[1], q.shape[-1]
    if (jax.default_backend() == "gpu" and T == S and bias is None and not self_visible and window is None and rule == PLAIN
            and Dh % 8 == 0 and Dh <= 128 and q.dtype in (jnp.bfloat16, jnp.float16)):  # what cuDNN flash attention takes
        return _on_plain_causal(q, k, v, q_slot, k_slot, k_ok, attention_xla, "cudnn")
    return attention_xla(q, k, v, q_slot, k_slot, k_ok, bias, self_visible=self_visible, window=window, rule=rule)


def attention_xla(q, k, v, q_slot, k_slot, k_ok, bias=None, *, self_visible=False, window=None, rule=PLAIN):
    """`attention` without the library dispatch: XLA's paths only (the CPU path, the GPU fallback,
    and the benchmarks' variant without cuDNN)."""
    return attention_heads_major(q, _heads(k), _heads(v), q_slot, k_slot, k_ok, bias, self_visible=self_visible,
                                 window=window, rule=rule)


def attention_heads_major(q, kh, vh, q_slot, k_slot, k_ok, bias=None, *, self_visible=False, window=None,
                          rule=PLAIN):
    """`attention` with the keys and values stored heads-major, kh, vh [B, K, S, Dh]: the KV cache's
    layout, so that a decode step reads a layer's cache as it lies (no transpose, i.e. no copy, of the
    whole cache at every step)."""
    T, S = q.shape[1], kh.shape[2]
    if T == 1:
        return _single(q, kh, vh, _mask(q_slot, k_slot, k_ok, self_visible, window, rule)[:, 0], bias, rule)
    if T * S <= DIRECT_MAX:
        return _direct(q, kh, vh, q_slot, k_slot, k_ok, bias, self_visible, window, rule)
    return _blockwise(q, kh, vh, q_slot, k_slot, k_ok, bias, self_visible, window, QUERY_BLOCK, KEY_BLOCK, rule)


class Own(NamedTuple):
    """A decode step's own key and value, k, v [B, K, Dh], and their score bias [B] (None: none)."""

    k: jax.Array
    v: jax.Array
    bias: jax.Array | None = None


def attention_step(q, kh, vh, own: Own, q_slot, k_slot, k_ok, bias=None, *, window=None, rule=PLAIN):
    """One query per row over keys and values stored heads-major, kh, vh [B, K, S, Dh], and its own
    key and value (`Own`), not among them: `attention_heads_major` of T = 1 with the own entry
    written into the cache first (self_visible), to float rounding, without reading the write.
    A decode step attends before it writes: when attention reads the buffer the step has just
    updated, XLA:CPU fuses the update into the products and keeps a copy of every layer's keys and
    values for it, a read and a write of the whole cache at every step. q [B, 1, H, Dh];
    q_slot [B, 1]; k_slot, k_ok [B, S]; bias [B, S] or None -> [B, 1, H, Dh]"""
    mask = _mask(q_slot, k_slot, k_ok, False, window, rule)[:, 0]  # [B, S]: the cached keys the query sees
    return _single(q, kh, vh, mask, bias, rule, own)


def attention_run(q, kh, vh, own_k, own_v, q_slot, k_slot, k_ok, bias=None, *, rule=PLAIN):
    """A run of T queries per row (speculative decoding's verify pass) over keys and values stored
    heads-major, kh, vh [B, K, S, Dh], and the run's own keys and values, own_k, own_v [B, T, K, Dh],
    not among them (query i sees own entries 0..i, unbiased): `attention_heads_major` with the run
    written into the cache first, to float rounding, without reading the write (`attention_step`).
    Both parts are steps of one online softmax. q [B, T, H, Dh]; q_slot [B, T] (the run's slots);
    k_slot, k_ok [B, S] (cached keys at slots >= the run's first are not seen: entries a rejected
    draft left); bias [B, S] or None -> [B, T, H, Dh]"""
    B, T, H, Dh = q.shape
    qh = _queries(q, kh.shape[1])  # [B, K, G, T, Dh]
    carry = _init(B, kh.shape[1], qh.shape[2], T, Dh)
    cached = _mask(q_slot, k_slot, k_ok & (k_slot < q_slot[:, :1]), False, rule=rule)  # [B, T, S]
    carry = _update(carry, qh, kh, vh, cached, bias, rule.softcap, rows=True)
    own = _mask(q_slot, q_slot, jnp.ones(q_slot.shape, bool), False, rule=rule)  # [B, T, T]: causal
    carry = _update(carry, qh, _heads(own_k), _heads(own_v), own, None, rule.softcap)
    return _heads_last(_finish(carry), q.dtype)


def causal_pairs_executed(T: int) -> int:
    """(query, key) pairs scored per row for a full causal window of T real tokens (slots 0..T-1):
    the whole square on the direct path, else every (query block, key block) up to the block that
    holds the query block's last slot, block padding included.  (`flops.dense_forward_flops`)"""
    if T * T <= DIRECT_MAX:
        return T * T
    bq, bk = min(QUERY_BLOCK, T), min(KEY_BLOCK, T)
    return sum(bq * bk * ((min(T, (i + 1) * bq) - 1) // bk + 1) for i in range(-(-T // bq)))


def _mask(q_slot, k_slot, k_ok, self_visible, window=None, rule=PLAIN):
    """[B, Tq], [B, Sk], [B, Sk] -> [B, Tq, Sk] bool: which keys each query sees."""
    qs, ks = q_slot[:, :, None], k_slot[:, None, :]
    ok = k_ok[:, None, :] | (ks == qs) if self_visible else k_ok[:, None, :]
    if window is not None:
        ok = ok & ((ks >= window.q_from[:, :, None]) | window.k_anchor[:, None, :])
    if rule.sliding is not None:
        ok = ok & (ks > qs - rule.sliding)
    return (ks <= qs) & ok


def _update(carry, qb, kb, vb, mask, bias, softcap=None, rows=False):
    """One online-softmax step.  qb [B, K, G, Tq, Dh] (pre-scaled), kb, vb [B, K, Sk, Dh],
    mask [B, Tq, Sk] or None (all visible), bias [B, Sk] or None, softcap a float or None;
    carry (m, l [B, K, G, Tq], acc [B, K, G, Tq, Dh]) in float32.
    rows: the products over G x Tq query rows of one matrix, for keys read where they lie (a verify
    pass over a whole cache: with separate G and Tq axes XLA:CPU transposes the keys, a copy)."""
    m, l, acc = carry
    if rows:
        B, K, G, Tq, Dh = qb.shape
        s = jnp.einsum("bkrd,bksd->bkrs", qb.reshape(B, K, G * Tq, Dh), kb, preferred_element_type=jnp.float32)
        s = s.reshape(B, K, G, Tq, -1)
    else:
        s = jnp.einsum("bkgqd,bksd->bkgqs", qb, kb, preferred_element_type=jnp.float32)  # [B, K, G, Tq, Sk]
    if softcap is not None:
        s = layers.softcap(s, softcap)
    if bias is not None:
        s = s + bias[:, None, None, None, :]
    if mask is not None:
        s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))  # >= m, finite (m starts at the most negative float)
    p = jnp.exp(s - m_new[..., None])  # 0 where masked
    alpha = jnp.exp(m - m_new)
    if rows:
        pv = jnp.einsum("bkrs,bksd->bkrd", p.astype(vb.dtype).reshape(B, K, G * Tq, -1), vb,
                        preferred_element_type=jnp.float32).reshape(B, K, G, Tq, Dh)
    else:
        pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv


def _init(B, K, G, Tq, Dh):
    m = jnp.full((B, K, G, Tq), jnp.finfo(jnp.float32).min)
    return m, jnp.zeros((B, K, G, Tq)), jnp.zeros((B, K, G, Tq, Dh))


def _finish(carry):
    """acc / l, zeros where l = 0 (no visible key).  -> [B, K, G, Tq, Dh]"""
    _, l, acc = carry
    return jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)


def _heads(k):
    """[B, S, K, Dh] -> [B, K, S, Dh]"""
    return k.transpose(0, 2, 1, 3)


def _queries(q, K: int):
    """q [B, T, H, Dh] -> [B, K, G, T, Dh] scaled by 1/sqrt(Dh) (query head h = k G + g)."""
    B, T, H, Dh = q.shape
    return (q * jnp.asarray(Dh**-0.5, q.dtype)).reshape(B, T, K, H // K, Dh).transpose(0, 2, 3, 1, 4)


def _heads_last(o, dtype):
    """[B, K, G, T, Dh] -> [B, T, H, Dh]"""
    B, K, G, T, Dh = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, Dh).astype(dtype)


def _direct(q, kh, vh, q_slot, k_slot, k_ok, bias, self_visible, window, rule):
    """All keys as one block: one [B, H, T, S] score tensor, no loop (small T x S)."""
    B, T, H, Dh = q.shape
    qh = _queries(q, kh.shape[1])
    mask = _mask(q_slot, k_slot, k_ok, self_visible, window, rule)
    carry = _update(_init(B, kh.shape[1], qh.shape[2], T, Dh), qh, kh, vh, mask, bias, rule.softcap)
    return _heads_last(_finish(carry), q.dtype)


def _single(q, kh, vh, mask, bias, rule, own=None):
    """One query per row (a decode step): a plain softmax over the S keys where they lie, and the
    query's own key and value when they are not in kh, vh yet (own: `Own`, always visible).
    q [B, 1, H, Dh], kh, vh [B, K, S, Dh], mask [B, S] bool, bias [B, S] or None -> [B, 1, H, Dh]

    Both products are batched matrix products over the keys as they lie (with a [B, K, G, 1, Dh]
    query XLA:CPU transposed every layer's keys, a copy of the whole cache at every step)."""
    qh = _queries(q, kh.shape[1])[:, :, :, 0]  # [B, K, G, Dh]
    score = lambda s, b: s if b is None else s + b  # soft-capped, then biased
    cap = (lambda s: s) if rule.softcap is None else (lambda s: layers.softcap(s, rule.softcap))
    s = jnp.einsum("bkgd,bksd->bkgs", qh, kh, preferred_element_type=jnp.float32)  # [B, K, G, S]
    s = jnp.where(mask[:, None, None], score(cap(s), None if bias is None else bias[:, None, None]), -jnp.inf)
    m = jnp.maximum(s.max(-1), jnp.finfo(jnp.float32).min)  # [B, K, G], finite
    if own is not None:
        s_own = jnp.einsum("bkgd,bkd->bkg", qh, own.k, preferred_element_type=jnp.float32)  # [B, K, G]
        s_own = score(cap(s_own), None if own.bias is None else own.bias[:, None, None])
        m = jnp.maximum(m, s_own)
    p = jnp.exp(s - m[..., None])  # 0 where masked
    l = p.sum(-1)
    acc = jnp.einsum("bkgs,bksd->bkgd", p.astype(vh.dtype), vh, preferred_element_type=jnp.float32)  # [B, K, G, Dh]
    if own is not None:
        p_own = jnp.exp(s_own - m)
        l, acc = l + p_own, acc + p_own[..., None] * own.v[:, :, None].astype(jnp.float32)
    return _heads_last(_finish((m, l, acc))[:, :, :, None], q.dtype)


def _blockwise(q, kh, vh, q_slot, k_slot, k_ok, bias, self_visible, window, bq, bk, rule=PLAIN):
    """Query blocks of bq (a `lax.map`), each scanning key blocks of bk (a `fori_loop` with a
    dynamic end); T and S are padded up to the block sizes with rows that see / are seen by nothing."""
    B, T, H, Dh = q.shape
    K, S = kh.shape[1], kh.shape[2]
    bq, bk = min(bq, T), min(bk, S)
    nq, nk = -(-T // bq), -(-S // bk)
    pad_t, pad_s = nq * bq - T, nk * bk - S
    qh = _queries(q, K)  # [B, K, G, T, Dh]
    G = qh.shape[2]
    qh = jnp.pad(qh, ((0, 0),) * 3 + ((0, pad_t), (0, 0)))
    kh = jnp.pad(kh, ((0, 0),) * 2 + ((0, pad_s), (0, 0)))
    vh = jnp.pad(vh, ((0, 0),) * 2 + ((0, pad_s), (0, 0)))
    q_slot = jnp.pad(q_slot.astype(jnp.int32), ((0, 0), (0, pad_t)), constant_values=_NO_Q)
    k_slot = jnp.pad(k_slot.astype(jnp.int32), ((0, 0), (0, pad_s)), constant_values=_NO_K)
    k_ok = jnp.pad(k_ok, ((0, 0), (0, pad_s)))
    bias = None if bias is None else jnp.pad(bias.astype(jnp.float32), ((0, 0), (0, pad_s)))
    k_first = k_slot.reshape(B, nk, bk).min(axis=(0, 2))  # [nk] smallest slot of each key block

    qblocks = qh.reshape(B, K, G, nq, bq, Dh).transpose(3, 0, 1, 2, 4, 5)  # [nq, B, K, G, bq, Dh]
    qslots = q_slot.reshape(B, nq, bq).transpose(1, 0, 2)  # [nq, B, bq]
    qfrom, k_anchor = None, None  # no window: nothing to carry per block
    if window is not None:
        q_from = jnp.pad(window.q_from.astype(jnp.int32), ((0, 0), (0, pad_t)))
        qfrom = q_from.reshape(B, nq, bq).transpose(1, 0, 2)  # [nq, B, bq]
        k_anchor = jnp.pad(window.k_anchor, ((0, 0), (0, pad_s)))

    def query_block(args):
        qb, qs, qf = args  # [B, K, G, bq, Dh], [B, bq], [B, bq]
        # key blocks past the last one holding a slot <= this block's largest slot are all masked
        end = jnp.max(jnp.where(k_first <= qs.max(), jnp.arange(1, nk + 1), 0))

        def key_block(j, carry):
            sl = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis)
            win = None if window is None else Window(qf, sl(k_anchor, 1))
            mask = _mask(qs, sl(k_slot, 1), sl(k_ok, 1), self_visible, win, rule)  # [B, bq, bk]
            kb, vb, bb = sl(kh, 2), sl(vh, 2), None if bias is None else sl(bias, 1)
            skip = lambda c: c  # nothing visible: not computed at all
            partial = lambda c: _update(c, qb, kb, vb, mask, bb, rule.softcap)
            full = lambda c: _update(c, qb, kb, vb, None, bb, rule.softcap)  # all visible: no select
            return jax.lax.switch(mask.any().astype(jnp.int32) + mask.all(), (skip, partial, full), carry)

        return _finish(jax.lax.fori_loop(0, end, key_block, _init(B, K, G, bq, Dh)))

    out = jax.lax.map(query_block, (qblocks, qslots, qfrom))  # [nq, B, K, G, bq, Dh]
    out = out.transpose(1, 2, 3, 0, 4, 5).reshape(B, K, G, nq * bq, Dh)[:, :, :, :T]
    return _heads_last(out, q.dtype)


def _on_plain_causal(q, k, v, q_slot, k_slot, k_ok, fallback, implementation):
    """`jax.nn.dot_product_attention` (is_causal) for left-padded causal windows: q_slot = k_slot =
    arange(T) and k_ok = (slot >= start) in every row, checked at run time by a scalar `lax.cond` (only
    one branch runs); otherwise `fallback`. cuDNN takes right padding (per-row lengths) but no left
    padding, so each row is rotated left by its start, real tokens first (their causal order is
    unchanged), and rotated back; padding queries see no key and are set to zero.
    `fallback(q, k, v, q_slot, k_slot, k_ok)` takes token-major keys and values like `attention`."""
    B, T = q_slot.shape
    ar = jnp.arange(T, dtype=jnp.int32)[None]  # [1, T]
    n = k_ok.sum(1).astype(jnp.int32)  # [B] real tokens per row
    start = (T - n)[:, None]  # [B, 1]
    plain = jnp.all(q_slot == ar) & jnp.all(k_slot == ar) & jnp.all(k_ok == (ar >= start))

    def library(q, k, v):
        rows = lambda x, idx: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)
        fwd = (ar + start) % T  # [B, T]: rotated index -> slot
        o = jax.nn.dot_product_attention(rows(q, fwd), rows(k, fwd), rows(v, fwd), is_causal=True, query_seq_lengths=n,
                                         key_value_seq_lengths=n, implementation=implementation)
        o = rows(o, (ar - start) % T)  # back to slots
        return jnp.where(k_ok[:, :, None, None], o, 0).astype(q.dtype)

    return jax.lax.cond(plain, library, lambda q, k, v: fallback(q, k, v, q_slot, k_slot, k_ok), q, k, v)
