"""Speculative decoding: the verify pass equals decode steps, greedy output equals plain greedy
decoding token for token (batches, end tokens, streaming, QuickSilver's caches), sampling keeps the
model's distribution, prompt lookup finds what it should."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsjax.dense.model import Sublayers, decode_step, run_step
from qsjax.dense.sampler import Sampling, filtered_logits
from qsjax.quicksilver.settings import QuickSilverConfig
from qsjax.runtime.generator import Generator
from qsjax.speculative.acceptance import verdict
from qsjax.speculative.lookup import lookup
from qsjax.speculative.settings import Speculation

NEW = 24


def tokenizer(eos=()):
    return types.SimpleNamespace(eos_ids=tuple(eos), pad_id=0, decode=lambda ids: "")


def prompts(rng, vocab, lengths=(13, 7, 10)):
    """Prompts that repeat a phrase (so that prompt lookup has something to find) and random ones."""
    phrase = rng.integers(2, vocab, 5).tolist()
    return [(phrase * 3)[:lengths[0]], rng.integers(2, vocab, lengths[1]).tolist(), (phrase * 2)[:lengths[2]]]


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama3-rope"])
def test_run_step_equals_decode_steps(name, tiny_models, rng):
    """A run of T tokens at per-row leads gives the logits of T decode steps, also over stale entries
    a longer earlier run left behind (rejected drafts)."""
    model, _ = tiny_models[name]
    module = model.module()
    B, P, T = 2, 9, 4
    seq = jnp.asarray(rng.integers(2, model.cfg.vocab_size, (B, P + 2 + T)), jnp.int32)
    start = jnp.asarray([0, 3])
    _, cache = model.prefill(seq[:, :P], start, 32)
    steps, c = [], cache
    for i in range(2 + T):
        logits, c = decode_step(module, c, seq[:, P + i])
        steps.append(logits)
    steps = jnp.stack(steps, 1)  # [B, 2 + T, V]
    # row 0 has 2 more tokens cached than row 1; first a junk run at row 1's lead 0, longer than needed
    junk = jnp.asarray(rng.integers(2, model.cfg.vocab_size, (B, T + 2)), jnp.int32)
    _, c = run_step(module, cache, junk, jnp.zeros(B, jnp.int32))
    _, c = run_step(module, c, seq[:, P:P + 2], jnp.zeros(B, jnp.int32))  # both rows: 2 tokens
    lead = jnp.asarray([2, 0])
    tokens = jnp.stack([seq[0, P + 2:P + 2 + T], seq[1, P:P + T]])
    logits, _ = run_step(module, c, tokens, lead)
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(steps[0, 2:]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(steps[1, :T]), atol=2e-5)


def generators(model, spec, qs=None, eos=()):
    plain, fast = Generator(model, tokenizer(eos), qs), Generator(model, tokenizer(eos), qs, speculation=spec)
    plain.eos_ids = fast.eos_ids = tuple(eos)
    return plain, fast


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-deep"])
@pytest.mark.parametrize("spec", [Speculation("lookup", 4, 2, break_even=0.0), Speculation("exit", 3, exit_layer=1, break_even=0.0)],
                         ids=["lookup", "exit"])
def test_greedy_output_is_plain_greedy(name, spec, tiny_models, rng):
    """Token for token, a batch of rows that accept different counts; drafts were accepted (the
    verify path ran), and the tally adds up."""
    model, _ = tiny_models[name]
    plain, fast = generators(model, spec)
    ids = prompts(rng, model.cfg.vocab_size)
    want, got = plain(ids, max_new_tokens=NEW), fast(ids, max_new_tokens=NEW)
    assert got.token_ids == want.token_ids
    tally = got.speculation
    assert tally["verify_steps"] > 0 and tally["drafted"] > 0 and tally["steps"] < NEW
    assert tally["tokens"] == sum(len(t) - 1 for t in got.token_ids)
    assert tally["row_steps"] <= len(ids) * tally["steps"]
    if spec.method == "lookup":
        assert tally["accepted"] > 0 and tally["mean_tokens_per_step"] > 1


def test_end_tokens_and_max_new(tiny_models, rng):
    """A row ends at its first end token, even inside an accepted run of drafts, and rows stop at
    max_new: the same rows, the same lengths as plain decoding."""
    model, _ = tiny_models["llama-gqa"]
    ids = prompts(rng, model.cfg.vocab_size)
    free = Generator(model, tokenizer())(ids, max_new_tokens=NEW).token_ids
    eos = [free[0][NEW // 2]]  # a token the first row makes mid-way
    plain, fast = generators(model, Speculation("lookup", 4, 2, break_even=0.0), eos=eos)
    for n in (1, 2, NEW):
        want, got = plain(ids, max_new_tokens=n), fast(ids, max_new_tokens=n)
        assert got.token_ids == want.token_ids
        assert all(len(t) <= n for t in got.token_ids)
    assert len(want.token_ids[0]) < NEW  # the end token ended row 0


def test_streaming_gives_the_tokens(tiny_models, rng):
    model, _ = tiny_models["gpt2"]
    _, fast = generators(model, Speculation("lookup", 4, 2, break_even=0.0))
    streamed = []
    got = fast(prompts(rng, model.cfg.vocab_size)[:1], max_new_tokens=NEW, stream=streamed.append)
    assert streamed == got.token_ids[0] and got.speculation["accepted"] > 0


@pytest.mark.parametrize("compact", [True, False], ids=["compacted", "masked"])
def test_after_a_quicksilver_prompt(compact, tiny_models, rng):
    """On the cache a QuickSilver prompt leaves (scope context: selection with a cut-off, compacted or
    the masked reference), speculative greedy decoding gives QuickSilver's plain tokens."""
    model, _ = tiny_models["llama-deep"]
    qs = QuickSilverConfig(scope="context", halt="select", halt_cutoff_layer=2, keep_top_k=0.5, n_sink=1,
                           compact=compact)
    plain, fast = generators(model, Speculation("lookup", 4, 2, break_even=0.0), qs)
    ids = prompts(rng, model.cfg.vocab_size, (30, 21, 26))
    want, got = plain(ids, max_new_tokens=NEW), fast(ids, max_new_tokens=NEW)
    assert got.token_ids == want.token_ids and got.speculation["verify_steps"] > 0
    assert got.quicksilver["prompt"] == want.quicksilver["prompt"]


def test_sampling_keeps_the_models_distribution():
    """The acceptance rule over many draws: the first emitted token follows p_0 whatever the draft,
    and the second (given the draft was accepted) follows p_1 (temperature, top-k, top-p applied)."""
    V, N = 6, 40000
    logits = jnp.asarray(np.random.default_rng(1).normal(0, 1.5, (1, 2, V)), jnp.float32)
    sampling, knobs = Sampling(True, 0.9, 5, 0.95), (jnp.float32(0.9), jnp.float32(0.95))
    p = np.asarray(jax.nn.softmax(filtered_logits(logits, sampling, *knobs), axis=-1))[0]  # [2, V]
    for draft in (int(p[0].argmax()), int(p[0].argmin()), 2):
        keys = jax.random.split(jax.random.key(draft), N)
        one = lambda k: verdict(logits, jnp.asarray([[draft]]), jnp.asarray([1]), k, sampling, *knobs)
        v = jax.jit(jax.vmap(one))(keys)
        first = np.asarray(v.tokens[:, 0, 0])
        np.testing.assert_allclose(np.bincount(first, minlength=V) / N, p[0], atol=0.012)
        accepted = np.asarray(v.accepted[:, 0]) == 1
        assert (first[accepted] == draft).all()
        if accepted.sum() > 5000:
            second = np.asarray(v.tokens[:, 0, 1])[accepted]
            np.testing.assert_allclose(np.bincount(second, minlength=V) / accepted.sum(), p[1], atol=0.02)


def test_sampled_generation_matches_plain_sampling(tiny_models, rng):
    """2,048 samples of one prompt (rows of one batch), plain and speculative: each new token's
    distribution is the same (total variation within sampling noise: two plain runs' distance, and a
    floor), while drafts were accepted."""
    model, _ = tiny_models["llama-gqa"]
    plain, fast = generators(model, Speculation("lookup", 3, 2, break_even=0.0))
    prompt, n, V = prompts(rng, model.cfg.vocab_size)[0], 2048, model.cfg.vocab_size
    sampling = Sampling(True, 0.7, 4, 1.0)
    runs = [g([prompt] * n, max_new_tokens=5, sampling=sampling, seed=seed) for g, seed in ((plain, 1), (plain, 2), (fast, 3))]
    assert runs[2].speculation["accepted"] > 0
    freq = lambda r, i: np.bincount([t[i] for t in r.token_ids if len(t) > i], minlength=V) / n
    tv = lambda a, b, i: 0.5 * np.abs(freq(a, i) - freq(b, i)).sum()
    for i in range(5):
        assert tv(runs[0], runs[2], i) < max(0.06, 2 * tv(runs[0], runs[1], i)), i


def test_lookup_takes_the_latest_longest_match():
    #                  0  1  2  3  4  5  6  7  8  9
    text = jnp.asarray([[9, 1, 2, 3, 4, 1, 2, 5, 6, 2],   # last 2-gram (6, 2) absent; 1-gram 2 -> latest at 6
                        [0, 0, 1, 2, 3, 7, 1, 2, 0, 0],   # text in places 2..7: last 2-gram (1, 2) at 2 -> 3 7 1
                        [4, 4, 4, 4, 4, 4, 4, 4, 4, 8]])  # (4, 8) nowhere, 8 nowhere: no draft
    drafts, n = lookup(text, jnp.asarray([0, 2, 0]), jnp.asarray([10, 8, 10]), 3, 2)
    assert np.asarray(n).tolist() == [3, 3, 0]
    assert np.asarray(drafts[0]).tolist() == [5, 6, 2] and np.asarray(drafts[1]).tolist() == [3, 7, 1]
    drafts, n = lookup(text[:1], jnp.asarray([0]), jnp.asarray([7]), 4, 2)  # text 9 1 2 3 4 1 2: (1, 2) at 1
    assert np.asarray(n).tolist() == [4] and np.asarray(drafts[0]).tolist() == [3, 4, 1, 2]


@pytest.mark.parametrize("spec", [Speculation("exit", 2, exit_layer=5)])
def test_exit_layer_must_be_inside(spec, tiny_models):
    model, _ = tiny_models["llama-gqa"]
    with pytest.raises(ValueError, match="below the model's 2 layers"):
        Generator(model, tokenizer(), speculation=spec)


def test_self_drafter_skips_what_it_says(tiny_models, rng):
    """Sublayers(attention={l}, mlp={l}) for every layer l: the run is the embedding through the head
    alone; skipping nothing is the full run."""
    model, _ = tiny_models["llama-gqa"]
    module = model.module()
    seq = jnp.asarray(rng.integers(2, model.cfg.vocab_size, (1, 6)), jnp.int32)
    _, cache = model.prefill(seq[:, :5], jnp.zeros(1, jnp.int32), 16)
    everything = frozenset({1, 2})
    skipped, _ = run_step(module, cache, seq[:, 5:], jnp.zeros(1, jnp.int32), skip=Sublayers(everything, everything))
    from qsjax.dense import blocks

    alone = blocks.lm_logits(module, blocks.embed(module, seq[:, 5:], jnp.asarray([[5]])))
    np.testing.assert_allclose(np.asarray(skipped), np.asarray(alone), atol=1e-6)
    full, _ = run_step(module, cache, seq[:, 5:], jnp.zeros(1, jnp.int32))
    step, _ = decode_step(module, cache, seq[:, 5])
    np.testing.assert_allclose(np.asarray(full[:, 0]), np.asarray(step), atol=1e-6)


GAP = 1e-3  # a near-tie: the model's two best logits closer than this (float32 rounding differs between passes)


def test_real_model_held_out_text(default_model_dir):
    """The default model on held-out C4 text (the sample's last documents, which no evaluation scores),
    a batch of three: speculative greedy tokens equal plain greedy ones, and wherever a row differs,
    re-scoring the plain text shows a near-tie (best two logits within GAP) at the first difference."""
    from qsjax import load_model, load_tokenizer
    from qsjax.evaluation.data import read_text, resolve_data

    model, tok = load_model(default_model_dir, "float32"), load_tokenizer(default_model_dir)
    docs = [d for d in read_text(resolve_data("c4")).split("\n\n") if len(d) > 600][-3:]
    asks = ("Summarise the text in two sentences.", "List the names and numbers the text gives.", "Copy the first "
            "paragraph of the text.")
    plain, fast = Generator(model, tok), Generator(model, tok, speculation=Speculation("lookup", 8, 2))
    ids = [plain.encode(f"{ask}\n\n{doc[:900]}", chat=True) for ask, doc in zip(asks, docs)]
    want, got = plain(ids, max_new_tokens=48), fast(ids, max_new_tokens=48)
    assert got.speculation["accepted"] > 0
    for prompt, a, b in zip(ids, want.token_ids, got.token_ids):
        if a == b:
            continue
        i = next(i for i, (x, y) in enumerate(zip(a + [-1], b + [-2])) if x != y)
        logits = np.asarray(model.logits([prompt + a[:i]]))[0, -1]
        top = np.sort(logits)[-2:]
        assert top[1] - top[0] < GAP, (i, top)
