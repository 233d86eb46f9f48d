"""Prefill + cached decode steps equal one forward over the whole sequence."""

import numpy as np
import pytest

from qsjax.dense.kvcache import KVCache


@pytest.mark.parametrize("name", ["gpt2", "llama-mha", "llama-gqa", "llama-mqa", "llama3-rope"])
def test_decode_equals_full_forward(name, tiny_models, rng):
    model, _ = tiny_models[name]
    T, N = 16, 6
    seq = rng.integers(0, model.cfg.vocab_size, (2, T + N))
    start = np.array([0, 4])  # the second row is left-padded by 4
    seq[1, :4] = 0
    full = np.asarray(model.logits(seq, start))  # [B, T+N, V]
    logits, cache = model.prefill(seq[:, :T], start, 32)
    np.testing.assert_allclose(np.asarray(logits), full[:, T - 1], atol=1e-5)
    for i in range(N):
        logits, cache = model.decode_step(cache, seq[:, T + i])
        np.testing.assert_allclose(np.asarray(logits), full[:, T + i], atol=1e-5)
    assert int(cache.index) == T + N


def test_cache_shape_and_validity(tiny_models):
    model, _ = tiny_models["llama-gqa"]
    cfg = model.cfg
    cache = KVCache.empty(cfg, batch=2, length=8, start=[0, 3])
    assert len(cache.k) == len(cache.v) == cfg.n_layers  # one buffer per layer, heads-major
    assert cache.k[0].shape == (2, cfg.n_kv_heads, 8, cfg.head_dim)
    assert not cache.holds(0).any()  # nothing written yet
    _, cache = model.prefill(np.ones((2, 5), np.int32), np.array([0, 3]), 8)
    for layer in range(cfg.n_layers):
        valid = np.asarray(cache.holds(layer))
        assert valid[0].tolist() == [True] * 5 + [False] * 3
        assert valid[1].tolist() == [False] * 3 + [True] * 2 + [False] * 3
    assert np.asarray(cache.slot[0])[1, 3:5].tolist() == [3, 4]  # a dense cache's place is the slot
    assert np.asarray(cache.fill).tolist() == [5] * cfg.n_layers


def test_decode_is_donated_and_does_not_recompile(tiny_models):
    model, _ = tiny_models["gpt2"]
    _, cache = model.prefill(np.ones((1, 4), np.int32), np.zeros(1, np.int32), 16)
    _, cache = model.decode_step(cache, np.array([1]))
    before = model._decode._cache_size()
    old = cache
    _, cache = model.decode_step(cache, np.array([2]))
    assert model._decode._cache_size() == before
    assert all(k.is_deleted() for k in old.k)  # the input cache buffers were donated to the step


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_decode_loop_copies_no_cache_buffer(name, tiny_models):
    """Decode steps in a compiled loop (as the Generator runs them) update the cache in place: the
    optimised program holds no copy of a layer's keys, values or slots (each such copy reads and
    writes the whole layer at every step, 5x the bytes a step must read before this was fixed)."""
    import re

    import jax

    from qsjax.dense.model import decode_step

    model, _ = tiny_models[name]
    cfg, S = model.cfg, 48  # a length no other array of the program has
    _, cache = model.prefill(np.ones((1, 4), np.int32), np.zeros(1, np.int32), S)

    def loop(state, cache):
        step = lambda i, c: decode_step(model.module(state), c, jax.numpy.ones(1, jax.numpy.int32))[1]
        return jax.lax.fori_loop(0, 3, step, cache)

    hlo = jax.jit(loop, donate_argnums=1).lower(model.state, cache).compile().as_text()
    buffers = (rf"f32\[1,{cfg.n_kv_heads},{S},{cfg.head_dim}\]", rf"s32\[1,{S}\]")
    copies = [line for line in hlo.splitlines() for b in buffers if re.search(rf"= {b}\{{[^}}]*\}} copy\(", line)]
    assert copies == [], copies[:3]
