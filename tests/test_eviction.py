"""Eviction to a budget during generation (StreamingLLM, H2O): the budget holds, sinks and recent
tokens stay, H2O evicts the lowest score, decoding stays causal and deterministic, and a budget
that holds everything is the dense cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsjax.kvpolicy.eviction import Eviction, evicting_prefill
from qsjax.dense.kvcache import EMPTY
from qsjax.dense.model import decode_step, prefill

T, N = 16, 10
START = np.array([0, 5])  # the second row is left-padded by 5


def sequences(rng, vocab):
    seq = rng.integers(2, vocab, (2, T + N))
    seq[1, :START[1]] = 0
    return seq


def run(model, rule, seq, steps=N - 1):
    """Evicting prefill of seq[:, :T] and `steps` decode steps on the rest -> logits [B, 1 + steps, V], caches"""
    module = model.module()
    pre = jax.jit(lambda t: evicting_prefill(module, t, jnp.asarray(START), rule, N))
    step = jax.jit(lambda c, t: decode_step(module, c, t))
    logits, cache = pre(jnp.asarray(seq[:, :T]))
    out, caches = [logits], [cache]
    for i in range(steps):
        logits, cache = step(cache, jnp.asarray(seq[:, T + i]))
        out.append(logits)
        caches.append(cache)
    return np.stack([np.asarray(a) for a in out], 1), caches


def held_positions(cache, layer):
    """Per row, the sorted positions of the tokens a layer holds."""
    slot, start = np.asarray(cache.kv.slot[layer]), np.asarray(cache.kv.start)
    return [sorted((s[s != EMPTY] - b).tolist()) for s, b in zip(slot, start)]


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_budget_that_holds_everything_is_dense(policy, name, tiny_models, rng):
    model, _ = tiny_models[name]
    seq = sequences(rng, model.cfg.vocab_size)
    logits, caches = run(model, Eviction(policy, budget=T + N), seq)
    full = np.asarray(model.logits(seq, START))
    np.testing.assert_allclose(logits, full[:, T - 1:T + N - 1], atol=1e-5, rtol=0)
    assert caches[-1].kv.length() == T + N


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_streaming_equals_sinks_plus_window_mask(name, tiny_models, rng):
    """StreamingLLM with a budget below the prompt = the dense cache with each new token seeing only
    the sinks and the latest budget - n_sink tokens (itself included); the prompt itself runs dense."""
    model, _ = tiny_models[name]
    rule = Eviction("streaming", budget=9, n_sink=2)
    seq = sequences(rng, model.cfg.vocab_size)
    logits, _ = run(model, rule, seq)
    module = model.module()
    ref, cache = prefill(module, jnp.asarray(seq[:, :T]), jnp.asarray(START), T + N)
    out = [np.asarray(ref)]
    step = jax.jit(lambda c, t, m: decode_step(module, c, t, m))
    for i in range(N - 1):
        pos = np.arange(T + N)[None] - START[:, None]
        mask = (pos < rule.n_sink) | (pos > T + i - START[:, None] - (rule.budget - rule.n_sink))
        ref, cache = step(cache, jnp.asarray(seq[:, T + i]), jnp.asarray(np.broadcast_to(mask, (2, 2, T + N))))
        out.append(np.asarray(ref))
    np.testing.assert_allclose(logits[:, 1:], np.stack(out, 1)[:, 1:], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[:, 0], out[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_budget_sinks_and_recent_are_kept(policy, tiny_models, rng):
    model, _ = tiny_models["llama-deep"]
    rule = Eviction(policy, budget=10, n_sink=3, recent=None if policy == "streaming" else 4)
    seq = sequences(rng, 96)
    _, caches = run(model, rule, seq)
    for i, cache in enumerate(caches):
        t = T + i  # the slot of the next token: the cache holds tokens of slots < t
        for layer in range(6):
            assert cache.kv.length(layer) == rule.budget  # never more places than the budget
            for b, held in enumerate(held_positions(cache, layer)):
                n = t - START[b]  # real tokens so far
                assert len(held) == len(set(held)) == min(n, rule.budget)
                assert set(range(min(n, rule.n_sink))) <= set(held)  # sinks
                latest = rule.budget - rule.n_sink if policy == "streaming" else rule.window
                assert set(range(max(0, n - latest), n)) <= set(held)  # recent
                if policy == "streaming":
                    assert held == sorted(set(range(min(n, rule.n_sink))) | set(range(max(0, n - latest), n)))


def test_h2o_evicts_the_lowest_score(tiny_models, rng):
    model, _ = tiny_models["llama-gqa"]
    rule = Eviction("h2o", budget=8, n_sink=2, recent=2)
    seq = sequences(rng, 96)
    _, caches = run(model, rule, seq, steps=4)
    for before, after in zip(caches, caches[1:]):
        index = int(before.kv.index)
        for layer in range(2):
            slot, score = np.asarray(before.kv.slot[layer]), np.asarray(before.score[layer])
            now = np.asarray(after.kv.slot[layer])
            for b in range(2):
                pos = slot[b] - START[b]
                free = slot[b] == EMPTY
                candidates = ~free & (pos >= rule.n_sink) & (slot[b] < index - rule.window)
                expected = np.flatnonzero(free)[0] if free.any() else np.flatnonzero(candidates)[
                    np.argmin(score[b][candidates])]
                assert now[b, expected] == index  # the new token took the victim's place
                kept = np.arange(len(slot[b])) != expected
                np.testing.assert_array_equal(now[b, kept], slot[b, kept])  # nothing else moved


def test_h2o_scores_are_attention_mass(tiny_models, rng):
    """Each voting query spreads one unit of attention per head: without eviction the scores of a row
    sum to H x (observation window + decode steps)."""
    model, _ = tiny_models["llama-gqa"]
    rule = Eviction("h2o", budget=T + N, n_sink=2, recent=6)
    seq = sequences(rng, 96)
    _, caches = run(model, rule, seq, steps=3)
    H = model.cfg.n_heads
    for i, cache in enumerate(caches):
        for layer in range(2):
            np.testing.assert_allclose(np.asarray(cache.score[layer]).sum(-1), H * (6 + i), rtol=1e-5)


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_eviction_is_causal_and_deterministic(policy, tiny_models, rng):
    model, _ = tiny_models["llama-gqa"]
    rule = Eviction(policy, budget=8, n_sink=2, recent=None if policy == "streaming" else 2)
    seq = sequences(rng, 96)
    other = seq.copy()
    other[:, T + 4:] = (other[:, T + 4:] + 1) % 96  # a different future from step 5 on
    a, _ = run(model, rule, seq)
    b, _ = run(model, rule, seq)
    c, _ = run(model, rule, other)
    np.testing.assert_array_equal(a, b)  # the same run twice: the same logits, bit for bit
    np.testing.assert_array_equal(a[:, :5], c[:, :5])  # the past does not see the future
    assert not np.allclose(a[:, 6:], c[:, 6:])


def test_rule_errors():
    with pytest.raises(ValueError, match="must exceed"):
        Eviction("h2o", budget=8, n_sink=4, recent=4)
    with pytest.raises(ValueError, match="recent is for h2o"):
        Eviction("streaming", budget=8, recent=2)
    with pytest.raises(ValueError, match="policy"):
        Eviction("lru", budget=8)


@pytest.mark.parametrize("argv, message", [
    ("--kv-budget 0", "--kv-budget must be >= 1"),
    ("--kv-budget 8 --kv-evict h2o", "--kv-budget 8 must exceed --n-sink 4 [+] --kv-recent 4"),
    ("--kv-budget 4", "--kv-budget 4 must exceed --n-sink 4 [(]"),
    ("--kv-budget 8 --kv-recent 2", "--kv-recent is for h2o"),
    ("--kv-budget 64 --halt-cutoff-layer 3", "does not combine with QuickSilver"),
])
def test_flag_errors(argv, message):
    from qsjax.runtime.cli import UsageError
    from qsjax.generate import check_args, parse_args

    with pytest.raises(UsageError, match=message):
        check_args(parse_args(["hi", *argv.split()]))


def test_the_sinks_have_one_flag(capsys):
    """--n-sink sets eviction's sinks too; the old second flag is gone (argparse's one error line, status 2)."""
    from qsjax.generate import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(["hi", "--kv-sinks", "2"])
    assert stop.value.code == 2 and "unrecognized arguments: --kv-sinks" in capsys.readouterr().err


def test_flags_build_the_rule():
    from qsjax.kvpolicy.eviction import eviction_from_args
    from qsjax.generate import parse_args

    assert eviction_from_args(parse_args(["hi"]), False) is None
    rule = eviction_from_args(parse_args("hi --kv-budget 64 --kv-evict h2o --n-sink 2 --kv-recent 8".split()), False)
    assert rule == Eviction("h2o", 64, 2, 8)
    assert eviction_from_args(parse_args("hi --kv-budget 64".split()), False) == Eviction("streaming", 64, 4)


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_generator_with_a_budget(policy, tiny_models, rng):
    """`Generator(eviction=...)` makes the greedy tokens of the evicting prefill + decode steps, the same
    twice, with left-padded prompts of different lengths longer than the budget."""
    import types

    from qsjax.runtime.generator import Generator

    model, _ = tiny_models["llama-gqa"]
    rule = Eviction(policy, budget=8, n_sink=2, recent=None if policy == "streaming" else 2)
    tokenizer = types.SimpleNamespace(eos_ids=(), pad_id=0, decode=lambda ids: "")
    gen = Generator(model, tokenizer, eviction=rule)
    gen.eos_ids = ()
    prompts = [rng.integers(2, 96, 13).tolist(), rng.integers(2, 96, 10).tolist()]
    first, second = gen(prompts, max_new_tokens=N), gen(prompts, max_new_tokens=N)
    assert first.token_ids == second.token_ids
    seq = np.zeros((2, T + N), np.int32)
    for b, (prompt, new) in enumerate(zip(prompts, first.token_ids)):
        seq[b, T - len(prompt):] = prompt + new
    module, start = model.module(), jnp.asarray([T - len(p) for p in prompts])
    logits, cache = evicting_prefill(module, jnp.asarray(seq[:, :T]), start, rule, N)
    greedy = [np.asarray(logits).argmax(-1)]
    for i in range(N - 1):
        logits, cache = decode_step(module, cache, jnp.asarray(seq[:, T + i]))
        greedy.append(np.asarray(logits).argmax(-1))
    assert np.stack(greedy, 1).tolist() == [list(t) for t in first.token_ids]
