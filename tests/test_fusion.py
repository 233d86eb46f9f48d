"""Contextual Token Fusion: merging arithmetic and the parallel, causal pairing rule."""

import jax.numpy as jnp
import numpy as np

from qs_helpers import run_window
from qsjax.quicksilver.mechanisms import fusion
from qsjax.quicksilver.settings import QuickSilverConfig


def test_merge_is_size_weighted():
    h, prev = jnp.array([[[1.0, 0.0]]]), jnp.array([[[0.0, 1.0]]])
    merged, size = fusion.merge(h, prev, jnp.array([[1.0]]), jnp.array([[3.0]]))
    np.testing.assert_allclose(merged, [[[0.25, 0.75]]])
    assert float(size[0, 0]) == 4.0


def test_fused_group_keeps_the_later_token_and_sums_sizes(tiny_models, rng):
    model, _ = tiny_models["llama-gqa"]
    tokens = rng.integers(0, 96, (1, 24))
    qs = QuickSilverConfig(scope="all", fuse_threshold=0.2)
    _, tok, stats, cache = run_window(model, qs, tokens, needed=np.zeros((1, 24), bool))
    fused, size, alive, active = (np.asarray(a)[0] for a in (tok.fused, tok.size, tok.alive, tok.active))
    assert fused.any()
    assert (alive == ~fused).all() and not active[fused].any()  # nobody needs them: retired tokens stop
    assert size[alive].sum() == 24  # every token is represented by exactly one surviving group
    assert size[alive].max() > 1
    visible = np.asarray(cache.visible)[:, 0]  # [L, T]: keys visible per layer
    halt = np.asarray(tok.halt)[0]
    for t in np.nonzero(fused)[0]:
        assert not visible[halt[t]:, t].any()  # a retired token's key is gone above its fusion layer
    bias = np.asarray(cache.bias)[-1, 0]
    np.testing.assert_allclose(bias[alive], np.log(size[alive]), atol=1e-6)

    # the same window with every prediction needed: retired tokens compute on for themselves only
    logits, tok2, _, cache2 = run_window(model, qs, tokens)
    np.testing.assert_array_equal(np.asarray(tok2.fused), np.asarray(tok.fused))
    assert (np.asarray(tok2.halt)[0][fused] == 2).all()
    np.testing.assert_array_equal(np.asarray(cache2.visible), np.asarray(cache.visible))  # still invisible to others
    for t in np.nonzero(fused)[0][:2]:  # t's prediction is what it was before token t + 1 existed
        alone, _, _, _ = run_window(model, qs, tokens[:, : t + 1])
        np.testing.assert_allclose(logits[0, t], alone[0, t], atol=1e-5)


def test_no_fusion_below_threshold(tiny_models, rng):
    model, _ = tiny_models["gpt2"]
    tokens = rng.integers(0, 96, (1, 24))
    # tau = 1, the largest a cosine can be (the config refuses more): cos > tau never holds
    logits, tok, _, _ = run_window(model, QuickSilverConfig(scope="all", fuse_threshold=1.0), tokens)
    assert not np.asarray(tok.fused).any()
    np.testing.assert_allclose(logits, np.asarray(model.logits(tokens)), atol=1e-5, rtol=0)
