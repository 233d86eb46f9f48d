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
