"""Sampling filters against Hugging Face's logits warpers, and the compiled generation loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qsjax.dense.sampler import Sampling, generate, next_token, top_p_filter


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 1.0])
def test_top_p_keeps_the_same_tokens_as_transformers(top_p, rng):
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = rng.normal(0, 3, (4, 200)).astype(np.float32)
    ours = np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), top_p)))
    ref = TopPLogitsWarper(top_p)(None, torch.tensor(logits))
    np.testing.assert_array_equal(ours, torch.isfinite(ref).numpy())


def test_top_k_samples_only_among_the_k_best(rng):
    logits = jnp.asarray(rng.normal(0, 1, (2, 100)).astype(np.float32))
    best3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    sampling = Sampling(do_sample=True, top_k=3)
    seen = set()
    for seed in range(200):
        tok = np.asarray(next_token(logits, jax.random.key(seed), sampling, 1.0, 1.0))
        for b in range(2):
            assert tok[b] in best3[b]
            seen.add((b, int(tok[b])))
    assert len(seen) == 6  # all three candidates of both rows do get drawn


def test_greedy_is_argmax(rng):
    logits = jnp.asarray(rng.normal(0, 1, (3, 50)).astype(np.float32))
    np.testing.assert_array_equal(next_token(logits, None, Sampling(), 1.0, 1.0), np.argmax(logits, -1))


def test_generation_loop_matches_step_by_step_argmax(tiny_models, rng):
    """The compiled while-loop produces what repeated full forwards + argmax produce."""
    model, _ = tiny_models["llama-gqa"]
    prompts = [rng.integers(2, 96, 7).tolist(), rng.integers(2, 96, 3).tolist()]
    T, N = 8, 6
    tokens = np.zeros((2, T), np.int32)
    start = np.array([T - len(p) for p in prompts])
    for row, p in zip(tokens, prompts):
        row[T - len(p):] = p
    run = jax.jit(lambda state, t, s: generate(model.module(state), t, s, jax.random.key(0), (1.0, 1.0), max_new=N,
                                               cache_length=16, sampling=Sampling(), eos_ids=(), pad_id=0))
    out, steps, _ = run(model.state, tokens, start)
    assert int(steps) == N
    for b, p in enumerate(prompts):
        seq = list(p)
        for _ in range(N):
            seq.append(int(np.argmax(np.asarray(model.logits(np.array([seq])))[0, -1])))
        assert np.asarray(out)[b].tolist() == seq[len(p):]


def test_rows_stop_at_eos(tiny_models):
    model, _ = tiny_models["gpt2"]
    tokens = np.array([[5, 6, 7, 8]], np.int32)
    ref = jax.jit(lambda s: generate(model.module(s), tokens, np.zeros(1, np.int32), jax.random.key(0), (1.0, 1.0),
                                     max_new=5, cache_length=16, sampling=Sampling(), eos_ids=(), pad_id=0))
    free = np.asarray(ref(model.state)[0])[0]
    eos = int(free[1])  # declare the second generated token an EOS
    run = jax.jit(lambda s: generate(model.module(s), tokens, np.zeros(1, np.int32), jax.random.key(0), (1.0, 1.0),
                                     max_new=5, cache_length=16, sampling=Sampling(), eos_ids=(eos,), pad_id=0))
    out, steps, _ = run(model.state)
    stop = free.tolist().index(eos)
    assert int(steps) == stop + 1
    assert np.asarray(out)[0, : stop + 1].tolist() == free[: stop + 1].tolist()
    assert (np.asarray(out)[0, stop + 1:] == 0).all()
