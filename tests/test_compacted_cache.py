"""The compacted cache (each layer keeps only the prompt entries it shows) decodes exactly as the
masked QuickSilverCache and as one window pass, and is physically smaller above a cut-off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qs_helpers import run_window
from qsjax.quicksilver.decoding.compacted import compact, kept_places, visible_counts
from qsjax.quicksilver.settings import QuickSilverConfig
from qsjax.quicksilver.decoding.steps import prepare, quicksilver_prefill

SETTINGS = {
    "cutoff-mask": QuickSilverConfig(halt="cutoff", halt_cutoff_layer=1, kv_skip="mask"),
    "cutoff-zero": QuickSilverConfig(halt="cutoff", halt_cutoff_layer=1, kv_skip="zero"),
    "cutoff-propagate": QuickSilverConfig(halt="cutoff", halt_cutoff_layer=1, kv_skip="propagate"),
    "cutoff-propagate-span": QuickSilverConfig(halt="cutoff", halt_cutoff_layer=1, kv_skip="propagate",
                                               kv_propagate_span=0),
    "attention-select": QuickSilverConfig(halt="select", halt_cutoff_layer=1, keep_top_k=0.5, select_queries=4),
    "recency-select": QuickSilverConfig(halt="select", select_signal="recency", halt_cutoff_layer=1, keep_top_k=0.3),
    "drift": QuickSilverConfig(halt="drift", halt_drift=0.9, halt_entropy=6.555),
    "fusion": QuickSilverConfig(fuse_threshold=0.2),
    "amq-cutoff": QuickSilverConfig(halt="cutoff", halt_cutoff_layer=1, amq_layer=2, amq_low=6.54, amq_high=6.56),
}
T, N = 32, 8


def nbytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def run(model_name, qs, tiny_models, rng):
    """Two left-padded prompts of different lengths -> (masked logits, compacted logits, window logits)
    for the prompt's last token and N - 1 generated ones, each [B, N, V], and both caches after the prompt."""
    model, _ = tiny_models[model_name]
    prepared = prepare(model, qs)
    start = np.array([0, 7])
    seq = rng.integers(2, 96, (2, T + N))
    seq[1, :7] = 0
    prefill = jax.jit(lambda s, t, length: quicksilver_prefill(qs, prepared.module(s), t, jnp.asarray(start), length),
                      static_argnums=2)
    masked = prefill(prepared.state, jnp.asarray(seq[:, :T]), T + N).state
    fresh = prefill(prepared.state, jnp.asarray(seq[:, :T]), T)
    kept = kept_places(visible_counts(fresh.state), T)
    compacted = jax.jit(compact, static_argnums=(1, 2))(fresh.state, kept, N)
    step = jax.jit(lambda s, c, t: c.decode_step(prepared.module(s), t))
    out_m, out_c, caches = [fresh.logits], [fresh.logits], (masked, compacted)
    for i in range(N - 1):
        lm, masked = step(prepared.state, masked, jnp.asarray(seq[:, T + i]))
        lc, compacted = step(prepared.state, compacted, jnp.asarray(seq[:, T + i]))
        out_m.append(lm)
        out_c.append(lc)
    window = []
    for b in range(2):  # the reference: one pass over each row's real tokens and continuation
        row = seq[b:b + 1, start[b]:]
        P = T - start[b]
        slots = np.arange(row.shape[1])[None]
        logits, _, _, _ = run_window(model, qs, row, eligible=slots < P - 1, needed=slots >= P - 1)
        window.append(logits[0, P - 1:P - 1 + N])
    stack = lambda out: np.stack([np.asarray(a) for a in out], axis=1)
    return stack(out_m), stack(out_c), np.stack(window), caches, kept


@pytest.mark.parametrize("name", list(SETTINGS))
def test_compacted_equals_masked_and_window(name, tiny_models, rng):
    masked, compacted, window, _, _ = run("llama-gqa", SETTINGS[name], tiny_models, rng)
    np.testing.assert_allclose(compacted, masked, atol=1e-5, rtol=0)
    np.testing.assert_allclose(compacted, window, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["cutoff-mask", "fusion"])
def test_compacted_equals_masked_mha(name, tiny_models, rng):
    """GPT-2 (multi-head attention, learned positions)."""
    masked, compacted, window, _, _ = run("gpt2", SETTINGS[name], tiny_models, rng)
    np.testing.assert_allclose(compacted, masked, atol=1e-5, rtol=0)
    np.testing.assert_allclose(compacted, window, atol=1e-5, rtol=0)


def test_layers_above_the_cutoff_hold_fewer_places(tiny_models, rng):
    qs = QuickSilverConfig(halt="cutoff", halt_cutoff_layer=3, kv_skip="mask")
    _, _, _, (masked, compacted), kept = run("llama-deep", qs, tiny_models, rng)
    # layers 1-3 show the whole prompt; above, only the 4 sinks and the last prompt token: 16 places (bucket)
    assert kept == (T, T, T, 16, 16, 16)
    assert [compacted.kv.length(l) for l in range(6)] == [T + N] * 3 + [16 + N] * 3  # room for the N new tokens
    assert nbytes(compacted) < nbytes(masked)
