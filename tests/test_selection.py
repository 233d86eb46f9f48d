"""Importance selection: its scores (attention from the last queries only, per KV head or summed,
accumulated over layers, pooled), the recent window, the keep budget and the pyramid's second stage,
and the invariants of the pass (causality, prefill + decode == one window, compacted == masked)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qs_helpers import run_window
from qsjax.dense.layers import grouped_scores
from qsjax.quicksilver.mechanisms import selection
from qsjax.quicksilver.settings import QuickSilverConfig, preset

L = 6  # the llama-deep fixture


def received_reference(q, k, queries, keys_visible, heads="sum"):
    """Every query's attention computed (T x T) and masked to the voters: the reference."""
    T = q.shape[1]
    scores = grouped_scores(q, k)  # [B, K, G, T, S]
    slots = jnp.arange(T)
    mask = (slots[None, :] <= slots[:, None])[None] & keys_visible[:, None, :]
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min), axis=-1)
    per_head = jnp.einsum("bkgts,bt->bks", probs, queries.astype(jnp.float32))
    return per_head.sum(1) if heads == "sum" else per_head.max(1)


@pytest.mark.parametrize("heads", ["sum", "max"])
def test_voters_only_equals_the_full_reference(heads, rng):
    B, T, H, K, Dh, n = 2, 20, 4, 2, 8, 5
    q = jnp.asarray(rng.normal(size=(B, T, H, Dh)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(B, T, K, Dh)).astype(np.float32))
    slots = jnp.broadcast_to(jnp.arange(T), (B, T))
    eligible = (slots >= 2) & (slots < jnp.array([[16], [6]]))  # row 1: only 4 candidates, fewer than n
    computing = jnp.asarray(rng.random((B, T)) < 0.8)
    mask = selection.last_n(eligible & computing, n)
    visible = jnp.asarray(rng.random((B, T)) < 0.7) | mask
    idx, ok = selection.voters(eligible, computing, n)
    q_voters = jnp.take_along_axis(q, idx[..., None, None], axis=1)
    got = selection.received(q_voters, k, idx, slots, ok, visible, heads)
    want = received_reference(q, k, mask, visible, heads)
    assert got.shape == (B, T) and int(ok[1].sum()) < n
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)
    if heads == "sum":  # each voter's distribution, for each of the H query heads, sums to 1
        np.testing.assert_allclose(np.asarray(got.sum(-1)), H * np.asarray(mask.sum(-1)), rtol=1e-5)
    else:  # the largest KV head's share: between a 1/K share of the sum and the sum
        total = received_reference(q, k, mask, visible, "sum")
        assert (got <= total + 1e-6).all() and (got >= total / K - 1e-6).all() and (got < total - 1e-3).any()


def test_last_n_and_voters():
    mask = jnp.array([[True, False, True, True, False, True]])
    assert np.asarray(selection.last_n(mask, 2))[0].tolist() == [False, False, False, True, False, True]
    idx, ok = selection.voters(mask, jnp.array([[True, True, True, False, True, True]]), 3)
    assert np.asarray(idx)[0].tolist() == [0, 2, 5] and np.asarray(ok).all()


def pool_reference(score, candidates, width, kind):
    out = np.zeros_like(score)
    for j in range(len(score)):
        near = [i for i in range(j - width // 2, j + width // 2 + 1) if 0 <= i < len(score) and candidates[i]]
        vals = [score[i] for i in near]
        out[j] = (max(vals) if kind == "max" else sum(vals) / len(vals)) if vals else np.nan
    return out


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_over_candidates_only(kind, rng):
    score = rng.random(12).astype(np.float32)
    score[0] = score[8] = 50.0  # a sink and a scored token: large, but not candidates
    cand = np.ones(12, bool)
    cand[[0, 8]] = False
    got = np.asarray(selection.pool(jnp.asarray(score)[None], jnp.asarray(cand)[None], 5, kind))[0]
    np.testing.assert_allclose(got[cand], pool_reference(score, cand, 5, kind)[cand], rtol=1e-6)
    assert got[cand].max() < 50  # nothing leaks from non-candidates
    np.testing.assert_array_equal(np.asarray(selection.pool(jnp.asarray(score)[None], cand[None], 1, kind))[0], score)


def test_pooling_brings_a_selected_keys_neighbours():
    score = jnp.array([[0.0, 0.25, 0.0, 0.2, 5.0, 0.3, 0.0, 0.0, 0.0, 0.0]])
    cand = jnp.ones((1, 10), bool)
    n_keep = jnp.array([3])
    alone = np.asarray(selection.keep(score, cand, n_keep))[0]
    assert np.flatnonzero(alone).tolist() == [1, 4, 5]  # 4's left neighbour 3 scores below 1
    pooled = np.asarray(selection.keep(selection.pool(score, cand, 3, "max"), cand, n_keep))[0]
    assert np.flatnonzero(pooled).tolist() == [3, 4, 5]  # pooled: 4 brings both neighbours


def test_keep_budget_and_recent_window():
    score = jnp.array([[5.0, 1.0, 3.0, 4.0, 2.0, 9.0]])
    cand = jnp.array([[True, True, True, True, True, False]])
    n = selection.budget(cand, 0.4)
    assert n.tolist() == [2]
    assert np.asarray(selection.keep(score, cand, n))[0].tolist() == [True, False, False, True, False, False]
    # one recent token first (the last candidate, 4), then the best score
    assert np.asarray(selection.keep(score, cand, n, 1))[0].tolist() == [True, False, False, False, True, False]
    # a recent window wider than the budget: the budget's most recent candidates only
    assert np.asarray(selection.keep(score, cand, n, 3))[0].tolist() == [False, False, False, True, True, False]
    # a share of the budget, rounded up: 0.3 of 2 -> the one most recent, then the best score ...
    assert np.asarray(selection.keep(score, cand, n, 0.3))[0].tolist() == [True, False, False, False, True, False]
    # ... per row: budgets 2 and 4 with a share of 0.5 keep 1 and 2 recent tokens (4; 4, 3), then scores
    two = jnp.concatenate([score, score]), jnp.concatenate([cand, cand])
    got = np.asarray(selection.keep(*two, jnp.array([2, 4]), 0.5))
    assert got.tolist() == [[True, False, False, False, True, False], [True, False, True, True, True, False]]
    assert selection.budget(cand, 0.01).tolist() == [1]  # at least one ...
    assert selection.budget(jnp.zeros((1, 6), bool), 0.5).tolist() == [0]  # ... of those there are
    assert selection.budget(cand, 0.4, 4).tolist() == [4]  # select_min_keep: a floor ...
    assert selection.budget(cand, 0.4, 9).tolist() == [5]  # ... never above the candidates


def test_min_keep_spares_short_prompts_and_the_long_preset_is_one(tiny_models, rng):
    """With at most select_min_keep eligible tokens nothing halts; above it the floor holds. The
    `long` preset (floor 1,024) leaves a short window exactly as dense."""
    model, _ = tiny_models["llama-deep"]
    base = dict(halt="select", halt_cutoff_layer=2, keep_top_k=0.25)
    tokens = rng.integers(0, 96, (1, 24))
    eligible, needed = np.arange(24)[None] < 16, np.arange(24)[None] >= 16  # 12 eligible after the 4 sinks
    halt = lambda qs: np.asarray(run_window(model, qs, tokens, eligible, needed)[1].halt)[0]
    assert (halt(QuickSilverConfig(**base, select_min_keep=12)) == L).all()
    assert (halt(QuickSilverConfig(**base, select_min_keep=8))[4:16] == L).sum() == 8
    assert (halt(QuickSilverConfig(**base))[4:16] == L).sum() == 3
    long = preset("long", L)
    assert long.halt == "select" and long.select_min_keep == 1024 and long.halt_cutoff_layer == 2
    got, tok = run_window(model, long, tokens, eligible, needed)[:2]
    want = run_window(model, QuickSilverConfig(**{**base, "keep_top_k": 1.0}), tokens, eligible, needed)[0]
    assert (np.asarray(tok.halt) == L).all()
    np.testing.assert_allclose(got[0, 16:], want[0, 16:], atol=1e-5, rtol=0)


# on the 6-layer model: plain layers below c, the selection layer(s), compacted layers above
SETTINGS = {
    "heads-max": QuickSilverConfig(halt="select", halt_cutoff_layer=2, keep_top_k=0.4, select_heads="max",
                                   select_queries=4),
    "pool-avg": QuickSilverConfig(halt="select", halt_cutoff_layer=2, keep_top_k=0.4, select_pool=5,
                                  select_pool_kind="avg"),
    "accumulate-pool-max": QuickSilverConfig(halt="select", halt_cutoff_layer=3, keep_top_k=0.4, select_accumulate=True,
                                             select_pool=3),
    "recent": QuickSilverConfig(halt="select", halt_cutoff_layer=2, keep_top_k=0.5, select_recent=3),
    "recent-share": QuickSilverConfig(halt="select", halt_cutoff_layer=2, keep_top_k=0.5, select_recent=0.5,
                                      select_pool=3),
    "pyramid-accumulate-propagate": QuickSilverConfig(
        halt="select", halt_cutoff_layer=2, keep_top_k=0.6, halt_cutoff_layer2=4, keep_top_k2=0.3, select_recent=2,
        select_accumulate=True, kv_skip="propagate", kv_propagate_span=1),
    "pyramid-recency": QuickSilverConfig(halt="select", select_signal="recency", halt_cutoff_layer=2, keep_top_k=0.5,
                                         halt_cutoff_layer2=3, keep_top_k2=0.25),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_causality(name, tiny_models, rng):
    """The predictions that are read (after the context) never depend on later tokens, and the
    context's decisions do not depend on anything after the context."""
    model, _ = tiny_models["llama-deep"]
    qs, T, C = SETTINGS[name], 24, 16
    a = rng.integers(0, 96, (1, T))
    eligible, needed = np.arange(T)[None] < C, np.arange(T)[None] >= C
    la, tok_a, _, _ = run_window(model, qs, a, eligible, needed)
    assert (np.asarray(tok_a.halt)[0, :C] < L).any()  # the setting does act
    for t in (C, 19, T - 2):
        b = a.copy()
        b[0, t + 1:] = rng.integers(0, 96, T - t - 1)
        lb, tok_b, _, _ = run_window(model, qs, b, eligible, needed)
        np.testing.assert_array_equal(la[0, C: t + 1], lb[0, C: t + 1])
        np.testing.assert_array_equal(np.asarray(tok_a.halt), np.asarray(tok_b.halt))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_prefill_then_decode_equals_one_pass(name, tiny_models, rng):
    """Prompt prefill (scope=context: every prompt token but the last may halt) + cached decode steps
    give one window pass's logits and decisions, over two left-padded rows."""
    from qsjax.quicksilver.decoding.steps import prepare, quicksilver_prefill

    model, _ = tiny_models["llama-deep"]
    qs = SETTINGS[name]
    B, P, N = 2, 16, 8
    seq = rng.integers(0, 96, (B, P + N))
    positions = np.arange(P + N)[None, :].repeat(B, 0)
    full, tok_full, _, _ = run_window(model, qs, seq, positions < P - 1, needed=positions >= P - 1)
    prepared = prepare(model, qs)
    p = jax.jit(lambda s, t: quicksilver_prefill(qs, prepared.module(s), t, jnp.zeros(B, jnp.int32), 32))(
        prepared.state, jnp.asarray(seq[:, :P]))
    np.testing.assert_array_equal(np.asarray(p.tokens.halt), np.asarray(tok_full.halt)[:, :P])
    np.testing.assert_allclose(np.asarray(p.logits), full[:, P - 1], atol=1e-5)
    step = jax.jit(lambda s, c, t: c.decode_step(prepared.module(s), t))
    state = p.state
    for i in range(N - 1):
        logits, state = step(prepared.state, state, jnp.asarray(seq[:, P + i]))
        np.testing.assert_allclose(np.asarray(logits), full[:, P + i], atol=1e-5)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_compacted_equals_masked(name, tiny_models, rng):
    """The fast path (the plain prefix scoring the voters when accumulating, gathered buckets above
    c) scores like the masked reference, with the same decisions and per-layer counts."""
    from qsjax.quicksilver.decoding.steps import prepare
    from qsjax.quicksilver.window.scoring import quicksilver_nll

    model, _ = tiny_models["llama-deep"]
    T, offset = 160, 110
    tokens = rng.integers(0, 96, (2, T)).astype(np.int32)
    lengths = np.array([T, 131], np.int32)
    out = {}
    for compact in (False, True):
        qs = dataclasses.replace(SETTINGS[name], compact=compact)
        prepared = prepare(model, qs)
        out[compact] = jax.jit(lambda s, t, n: quicksilver_nll(qs, prepared.module(s), t, n, offset))(
            prepared.state, tokens, lengths)
    ref, fast = out[False], out[True]
    scored = np.arange(offset + 1, T)[None, :] < lengths[:, None]
    np.testing.assert_allclose(np.asarray(fast.nll)[scored], np.asarray(ref.nll)[scored], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(fast.halt), np.asarray(ref.halt))
    for field in ("computing", "pairs", "selection_pairs", "selection_queries"):
        np.testing.assert_array_equal(np.asarray(getattr(fast.stats, field)), np.asarray(getattr(ref.stats, field)))
    assert (np.asarray(ref.halt) < L).sum() > 50  # the setting does act


def context_window(model, qs, rng, T=24, C=16):
    tokens = rng.integers(0, 96, (1, T))
    return run_window(model, qs, tokens, np.arange(T)[None] < C, np.arange(T)[None] >= C)


def test_accumulated_score_is_the_sum_of_the_layers_votes(tiny_models):
    """select_accumulate's score at c is layer 1's + ... + layer c's votes (each computed alone at
    its own selection layer); at c = 1 it is layer 1's, and at c = 3 it changes what is kept."""
    model, _ = tiny_models["llama-deep"]
    base = dict(halt="select", keep_top_k=0.4, select_queries=4)
    run = lambda seed=0, **kw: context_window(model, QuickSilverConfig(**base, **kw), np.random.default_rng(seed))[1]
    single = [np.asarray(run(halt_cutoff_layer=c).score) for c in (1, 2, 3)]
    np.testing.assert_allclose(np.asarray(run(halt_cutoff_layer=3, select_accumulate=True).score), sum(single),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(run(halt_cutoff_layer=1, select_accumulate=True).halt),
                                  np.asarray(run(halt_cutoff_layer=1).halt))
    changed = [(np.asarray(run(seed, halt_cutoff_layer=3, select_accumulate=True).halt)
                != np.asarray(run(seed, halt_cutoff_layer=3).halt)).sum() for seed in range(3)]
    assert max(changed) > 0, changed


@pytest.mark.parametrize("recent", [3, 0.5])  # a count, a share of the budget of 6
def test_recent_window_is_always_kept(recent, tiny_models, rng):
    model, _ = tiny_models["llama-deep"]
    qs = QuickSilverConfig(halt="select", halt_cutoff_layer=2, keep_top_k=0.5, select_recent=recent)
    for seed in range(3):
        halt = np.asarray(context_window(model, qs, np.random.default_rng(seed))[1].halt)[0]
        kept = np.flatnonzero(halt[4:16] == L) + 4  # eligible: positions 4..15, 12 tokens, budget 6
        assert len(kept) == 6 and {13, 14, 15} <= set(kept.tolist())
        assert (halt[4:16][halt[4:16] < L] == 2).all() and (halt[16:] == L).all() and (halt[:4] == L).all()


def test_pyramid_keeps_fewer_after_the_second_stage(tiny_models, rng):
    """Budgets are fractions of the 12 eligible tokens: 6 computing above c = 2, 3 above c2 = 4,
    the second stage choosing among the first's."""
    model, _ = tiny_models["llama-deep"]
    qs = QuickSilverConfig(halt="select", halt_cutoff_layer=2, keep_top_k=0.5, halt_cutoff_layer2=4, keep_top_k2=0.25)
    _, tok, stats, _ = context_window(model, qs, rng)
    halt = np.asarray(tok.halt)[0]
    assert (halt[4:16] == 2).sum() == 6 and (halt[4:16] == 4).sum() == 3 and (halt[4:16] == L).sum() == 3
    assert np.asarray(stats.computing)[:, 0].tolist() == [24, 24, 18, 18, 15, 15]
    pairs = np.asarray(stats.selection_pairs)[:, 0]
    # n_q x T at each selection layer only; the voters: all 12 eligible (< select_queries = 16) at c,
    # the 6 still computing at c2
    assert pairs.tolist() == [0, 12 * 24, 0, 6 * 24, 0, 0]
    assert np.asarray(stats.selection_queries)[:, 0].tolist() == [0, 12, 0, 6, 0, 0]


def test_accumulating_scores_every_layer_up_to_the_last_stage(tiny_models, rng):
    model, _ = tiny_models["llama-deep"]
    qs = QuickSilverConfig(halt="select", halt_cutoff_layer=2, keep_top_k=0.5, halt_cutoff_layer2=4, keep_top_k2=0.25,
                           select_accumulate=True, select_queries=5)
    stats = context_window(model, qs, rng)[2]
    assert np.asarray(stats.selection_queries)[:, 0].tolist() == [5, 5, 5, 5, 0, 0]
    assert np.asarray(stats.selection_pairs)[:, 0].tolist() == [5 * 24] * 4 + [0, 0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(select_heads="min"), "select_heads must be one of"),
    (dict(select_pool=4), "select_pool must be 0, 1 or an odd window"),
    (dict(select_pool_kind="median"), "select_pool_kind must be one of"),
    (dict(select_recent=-1), "select_recent must be >= 0, got -1"),
    (dict(select_recent=2.5), "select_recent must be a count"),
    (dict(select_min_keep=-1), "select_min_keep must be >= 0"),
    (dict(halt_cutoff_layer2=4), "go together"),
    (dict(halt_cutoff_layer2=2, keep_top_k2=0.2), "halt_cutoff_layer2=2 must be after halt_cutoff_layer=2"),
    (dict(halt_cutoff_layer2=4, keep_top_k2=0.5), r"keep_top_k2=0.5 must be in \(0, keep_top_k=0.5\)"),
    (dict(select_signal="recency", select_accumulate=True), "need select_signal=attention"),
    (dict(halt="cutoff", halt_cutoff_layer2=4, keep_top_k2=0.2), "second stage of halt=select"),
])  # fmt: skip
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuickSilverConfig(**{**dict(halt="select", halt_cutoff_layer=2, keep_top_k=0.5), **kwargs})
    with pytest.raises(ValueError, match="halt_cutoff_layer2=9 but the model has 6 layers"):
        QuickSilverConfig(halt="select", halt_cutoff_layer=2, halt_cutoff_layer2=9, keep_top_k2=0.2).validate_for(6)
