"""Speculative decoding on an evicting cache (StreamingLLM, H2O) is exact: a pass's tokens enter the
cache one after another as decode steps would, the commit keeps each row's accepted tokens and
nothing of the rest, and greedy output equals plain greedy decoding with the same eviction, token
for token (budgets below the prompt and below prompt + new tokens, rows accepting different counts)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsjax.dense.model import decode_step, run_step
from qsjax.kvpolicy.eviction import Eviction, evicting_prefill
from qsjax.runtime.generator import Generator
from qsjax.speculative.settings import Speculation

P, R = 12, 5  # prompt tokens, a run's tokens
START = np.array([0, 4])  # the second row is left-padded by 4
NEW = 24
LOOKUP, EXIT = Speculation("lookup", 4, 2, break_even=0.0), Speculation("exit", 3, exit_layer=1, break_even=0.0)
RULES = {"streaming": Eviction("streaming", budget=8, n_sink=2), "h2o": Eviction("h2o", budget=8, n_sink=2, recent=2)}


def layer_state(cache, layer: int, row: int):
    """What a layer holds for one row: slots, keys, values and scores."""
    return [np.asarray(a[row]) for a in (cache.kv.slot[layer], cache.kv.k[layer], cache.kv.v[layer], cache.score[layer])]


def assert_same_layers(got, want, row: int):
    for layer in range(len(want.score)):
        (slot, k, v, score), (slot_w, k_w, v_w, score_w) = layer_state(got, layer, row), layer_state(want, layer, row)
        np.testing.assert_array_equal(slot, slot_w)  # the same tokens in the same places
        for a, b in ((k, k_w), (v, v_w), (score, score_w)):
            np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_run_and_commit_equal_decode_steps(policy, tiny_models, rng):
    """A run of R tokens gives the logits of R decode steps with eviction; committing row 0's R tokens
    and row 1's first 2 leaves each row's layers as those steps did (the other 3 tokens of row 1 left
    no trace, though the run evicted for them); a second run at per-row leads again equals the steps."""
    model, _ = tiny_models["llama-gqa"]
    module, rule = model.module(), RULES[policy]
    seq = jnp.asarray(rng.integers(2, model.cfg.vocab_size, (2, P + 2 * R)), jnp.int32)
    _, cache = jax.jit(lambda t: evicting_prefill(module, t, jnp.asarray(START), rule, 2 * R))(seq[:, :P])
    assert cache.kv.length() == rule.budget
    step = jax.jit(lambda c, t: decode_step(module, c, t))
    steps, caches, c = [], [], cache
    for i in range(2 * R):
        logits, c = step(c, seq[:, P + i])
        steps.append(np.asarray(logits))
        caches.append(c)
    steps = np.stack(steps, 1)  # [B, 2R, V]
    run = jax.jit(lambda c, t, lead: run_step(module, c, t, lead))
    logits, ran = run(cache, seq[:, P:P + R], jnp.zeros(2, jnp.int32))
    np.testing.assert_allclose(np.asarray(logits), steps[:, :R], atol=2e-5)
    kept = jax.jit(lambda c, emit: c.commit(emit))(ran, jnp.asarray([R, 2]))
    assert kept.pending == ()
    assert_same_layers(kept, caches[R - 1], 0)
    assert_same_layers(kept, caches[1], 1)
    lead = jnp.asarray([R, 2])
    tokens = jnp.stack([seq[0, P + R:P + 2 * R], seq[1, P + 2:P + 2 + R]])
    logits, _ = run(kept, tokens, lead)
    np.testing.assert_allclose(np.asarray(logits[0]), steps[0, R:], atol=2e-5)
    np.testing.assert_allclose(np.asarray(logits[1]), steps[1, 2:2 + R], atol=2e-5)


def tokenizer():
    return types.SimpleNamespace(eos_ids=(), pad_id=0, decode=lambda ids: "")


def prompts(rng, vocab):
    """Two prompts that repeat a phrase (prompt lookup finds drafts, accepted in runs of different
    lengths) and a random one."""
    phrase = rng.integers(2, vocab, 5).tolist()
    return [(phrase * 3)[:13], rng.integers(2, vocab, 7).tolist(), (phrase * 2)[:10]]


@pytest.mark.parametrize("name, policy, budget, spec", [
    ("llama-gqa", "streaming", 10, LOOKUP), ("llama-gqa", "h2o", 10, LOOKUP), ("llama-gqa", "streaming", 10, EXIT),
    ("llama-gqa", "h2o", 10, EXIT), ("llama-gqa", "streaming", 24, LOOKUP), ("llama-gqa", "h2o", 24, LOOKUP),
    ("gpt2", "h2o", 10, LOOKUP),
], ids=lambda p: getattr(p, "method", p))  # fmt: skip
def test_greedy_output_is_plain_greedy_with_eviction(name, policy, budget, spec, tiny_models, rng):
    """Token for token with the same eviction, a budget below the prompt (10 < 13) or below prompt +
    new tokens (24 < 13 + 24), a batch whose rows accept different counts; drafts were verified, some
    accepted and some rejected (a commit that kept rejected drafts' tokens gives other tokens)."""
    model, _ = tiny_models[name]
    rule = Eviction(policy, budget, n_sink=2, recent=3 if policy == "h2o" and budget == 10 else None)
    plain, fast = Generator(model, tokenizer(), eviction=rule), Generator(model, tokenizer(), eviction=rule, speculation=spec)
    plain.eos_ids = fast.eos_ids = ()
    ids = prompts(rng, model.cfg.vocab_size)
    want, got = plain(ids, max_new_tokens=NEW), fast(ids, max_new_tokens=NEW)
    assert got.token_ids == want.token_ids
    assert got.kv_cache_bytes["this_setting"] == want.kv_cache_bytes["this_setting"]  # no room beyond the budget
    tally = got.speculation
    assert tally["verify_steps"] > 0 and 0 < tally["accepted"] < tally["drafted"]
    assert tally["tokens"] == sum(len(t) - 1 for t in got.token_ids)
