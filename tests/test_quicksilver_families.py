"""QuickSilver's invariants on the families beyond Llama, whose layers carry their own attention rule
(soft-capped scores, sliding windows: `attention.Rule`) and alternate in kind (a scan over layer
periods): all mechanisms off == dense; the compacted fast path == the masked reference; prompt
prefill + decode == one window pass; causality; and the selection signal and QuickSilver's local
window under a layer's own window. Tiny random models from tests/test_families.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qs_helpers import run_window
from qsjax.quicksilver.settings import QuickSilverConfig, preset
from test_compacted_cache import run as run_cached
from test_families import make

# the windows (5-7 slots) are shorter than every prompt below, so that they act. Each invariant runs
# on a few (family, setting) pairs, not the product: every pair is a few compiled programs
NAMES = ["qwen3", "mistral-window", "gemma2", "gemma3", "phi3-window-mqa"]
RULED = ["mistral-window", "gemma2", "gemma3", "phi3-window-mqa"]  # sliding windows and/or soft-capping
T = 24
CONTEXT = 16  # scope=context: the first 16 tokens are context (the 4 sinks never eligible), the rest scored

# each acts on these tiny models (checked where used); selection at layer 1, a sliding layer in every
# ruled family but gemma3 (whose layer 2 is global)
SETTINGS = {
    "cutoff-mask": QuickSilverConfig(halt="cutoff", halt_cutoff_layer=1, kv_skip="mask"),
    "select-local": QuickSilverConfig(halt="select", halt_cutoff_layer=1, keep_top_k=0.5, select_queries=4,
                                      local_window=3, local_full=4),
    "fusion": QuickSilverConfig(fuse_threshold=0.2),
}
ALL = QuickSilverConfig(scope="all", halt="drift", halt_drift=0.9, halt_entropy=None, kv_skip="propagate",
                        fuse_threshold=0.3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (qsjax float32 Model, None), as `tiny_models` holds them."""
    from qsjax.checkpoints.hf_params import load_model

    out = {}
    for name in NAMES:
        path = tmp_path_factory.mktemp(name)
        make(name).save_pretrained(path, safe_serialization=True)
        out[name] = (load_model(path), None)
    return out


def masks(B=1):
    positions = np.arange(T)[None, :].repeat(B, 0)
    return positions < CONTEXT, positions >= CONTEXT


@pytest.mark.parametrize("name", NAMES)
def test_all_off_is_dense(name, models, rng):
    """Masked reference and fast path with every mechanism off: the dense logits."""
    model, _ = models[name]
    tokens = rng.integers(2, 96, (2, T))
    dense = np.asarray(model.logits(tokens))
    for compact in (False, True):
        got = run_window(model, QuickSilverConfig(compact=compact), tokens)[0]
        np.testing.assert_allclose(got, dense, atol=1e-5, rtol=0)


def test_local_window_inside_the_layers_own_window_changes_nothing(models, rng):
    """On a model whose every layer slides over 5 slots, QuickSilver's far-context window of 5 slots
    with sinks leaves the logits dense: a query sees what both windows allow, and a sink outside the
    layer's window is not seen. A wider one (6) adds nothing either; a narrower one (3) does act."""
    model, _ = models["mistral-window"]
    tokens = rng.integers(2, 96, (2, T))
    dense = np.asarray(model.logits(tokens))
    for W in (5, 6):
        got = run_window(model, QuickSilverConfig(local_window=W, local_full=0, compact=False), tokens, *masks(2))[0]
        np.testing.assert_allclose(got, dense, atol=1e-5, rtol=0)
    narrow = run_window(model, QuickSilverConfig(local_window=3, local_full=0, compact=False), tokens, *masks(2))[0]
    assert np.abs(narrow[:, CONTEXT:] - dense[:, CONTEXT:]).max() > 1e-4


@pytest.mark.parametrize("rule", [(None, None), (2.0, None), (None, 3), (1.5, 4)], ids=str)
def test_selection_signal_is_the_layers_attention(rule, rng):
    """`selection.received` sums the very softmax weights attention uses under the layer's rule
    (read off attention's output with one-hot values): soft-capped scores, and nothing from a key
    outside a voter's sliding window."""
    from qsjax.dense.attention import Rule, attention
    from qsjax.quicksilver.mechanisms.selection import received

    B, S, H, K, Dh = 2, 12, 4, 2, 16
    q = jnp.asarray(rng.normal(size=(B, 3, H, Dh)) * 3, jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, S, K, Dh)) * 3, jnp.float32)
    q_slot = jnp.asarray([[5, 9, 11], [7, 10, 11]], jnp.int32)
    k_slot = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    visible = jnp.asarray(rng.random((B, S)) < 0.8)
    r = Rule(*rule)
    onehot = jnp.broadcast_to(jnp.eye(S, Dh)[None, :, None, :], (B, S, K, Dh))  # v_j = e_j
    probs = attention(q, k, onehot, q_slot, k_slot, visible, rule=r)[..., :S]  # [B, n, H, S]
    want = np.asarray(probs.sum((1, 2)))  # summed over voters and heads
    got = np.asarray(received(q, k, q_slot, k_slot, jnp.ones((B, 3), bool), visible, "sum", r))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    if r.sliding is not None:
        assert (got[:, :q_slot.min() - r.sliding + 1] == 0).all()


def test_selection_read_from_a_local_layer_scores_only_its_window(models, rng):
    """Selection after a sliding layer: the voters give nothing to keys outside their windows (those
    halt, but for the recent ones kept), and something to those inside."""
    model, _ = models["mistral-window"]
    W = model.cfg.windows[0]
    qs = QuickSilverConfig(halt="select", halt_cutoff_layer=1, keep_top_k=0.5, select_queries=2, compact=False)
    tokens = rng.integers(2, 96, (1, T))
    _, tok, _, _ = run_window(model, qs, tokens, *masks())
    score = np.asarray(tok.score)[0]
    first_voter = CONTEXT - 2
    assert (score[:first_voter - W + 1] == 0).all() and (score[first_voter - W + 1:CONTEXT] > 0).all()
    halt = np.asarray(tok.halt)[0]
    assert (halt[4:first_voter - W + 1] == 1).all()  # unselected: halted after layer 1


@pytest.mark.parametrize("name, setting", [("mistral-window", "select-local"), ("gemma2", "select-local"),
                                           ("gemma2", "fusion"), ("gemma3", "cutoff-mask"),
                                           ("phi3-window-mqa", "fusion")])
def test_compacted_equals_masked_reference(name, setting, models, rng):
    """Bucketed compaction gives the masked reference's decisions and logits on layers with their own
    rule (a right-padded row, more tokens than the smallest bucket)."""
    from qsjax.dense.blocks import lm_logits
    from qsjax.dense.model import Layout
    from qsjax.quicksilver.decoding.steps import prepare
    from qsjax.quicksilver.window.forward import quicksilver_window

    model, _ = models[name]
    T = 80
    tokens = jnp.asarray(rng.integers(2, 96, (2, T)))
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    valid = positions < jnp.array([[T], [70]])
    out = {}
    for compact in (False, True):
        qs = dataclasses.replace(SETTINGS[setting], compact=compact)
        prepared = prepare(model, qs)
        w = Layout.of(model.cfg, positions, valid)
        res = jax.jit(lambda s: quicksilver_window(qs, prepared.module(s), tokens, w, positions < 64,
                                                   positions >= 60))(prepared.state)
        out[compact] = np.asarray(lm_logits(prepared.module(), res.x)), res.tokens
    v = np.asarray(valid)
    np.testing.assert_allclose(out[True][0][v], out[False][0][v], atol=1e-5, rtol=0)
    for field in ("halt", "fused", "active"):
        np.testing.assert_array_equal(np.asarray(getattr(out[True][1], field)), np.asarray(getattr(out[False][1], field)))
    t = out[False][1]
    assert (np.asarray(t.halt) < model.cfg.n_layers).any() or np.asarray(t.fused).any()  # the setting acts


@pytest.mark.parametrize("name, setting", [("mistral-window", "cutoff-mask"), ("gemma2", "select-local"),
                                           ("gemma3", "fusion"), ("phi3-window-mqa", "select-local")])
def test_prefill_then_decode_equals_one_window(name, setting, models, rng):
    """Scope context: the masked cache and the compacted cache decode as one window pass over each
    left-padded row (`test_compacted_cache.run`)."""
    masked, compacted, window, _, _ = run_cached(name, SETTINGS[setting], models, rng)
    np.testing.assert_allclose(masked, window, atol=1e-5, rtol=0)
    np.testing.assert_allclose(compacted, window, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_scope_all_decode_equals_one_window(name, models, rng):
    """Scope all: each decode step's halting, fusion and logits are those of one window pass."""
    from qsjax.quicksilver.decoding.decode import quicksilver_decode_step
    from qsjax.quicksilver.decoding.steps import prepare, quicksilver_prefill

    model, _ = models[name]
    B, P, N = 2, 16, 8
    seq = rng.integers(2, 96, (B, P + N))
    positions = np.arange(P + N)[None, :].repeat(B, 0)
    full, tok, _, _ = run_window(model, ALL, seq, needed=positions >= P - 1)
    halt, fused = np.asarray(tok.halt), np.asarray(tok.fused)
    prepared = prepare(model, ALL)
    p = jax.jit(lambda s, t: quicksilver_prefill(ALL, prepared.module(s), t, jnp.zeros(B, jnp.int32), P + N))(
        prepared.state, jnp.asarray(seq[:, :P]))
    np.testing.assert_allclose(np.asarray(p.logits), full[:, P - 1], atol=1e-5, rtol=0)
    step = jax.jit(lambda s, c, t: quicksilver_decode_step(ALL, prepared.module(s), c, t))
    state = p.state
    for i in range(N - 1):
        logits, state, decided = step(prepared.state, state, jnp.asarray(seq[:, P + i]))
        np.testing.assert_allclose(np.asarray(logits), full[:, P + i], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(np.asarray(decided.halt), halt[:, P + i])
        np.testing.assert_array_equal(np.asarray(decided.prev_fused), fused[:, P + i - 1])
    assert (halt[:, P:] < model.cfg.n_layers).any() and fused.any()  # the setting acts on generated tokens


@pytest.mark.parametrize("name", RULED)
def test_causality(name, models, rng):
    """Changing tokens after t never changes the needed logits at positions <= t: every position
    under scope all (halting and fusion everywhere), the scored ones under selection with local
    attention."""
    model, _ = models[name]
    a = rng.integers(2, 96, (1, T))
    for qs, (eligible, needed), first in ((ALL, (None, None), 0), (SETTINGS["select-local"], masks(), CONTEXT)):
        la = run_window(model, qs, a, eligible, needed)[0]
        for t in (6, 13, 19):
            b = a.copy()
            b[0, t + 1:] = rng.integers(2, 96, T - t - 1)
            lb = run_window(model, qs, b, eligible, needed)[0]
            np.testing.assert_array_equal(la[0, first:t + 1], lb[0, first:t + 1])


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_generator_runs_quicksilver_on_every_family(name, models, rng):
    """The Generator takes a model with layer rules under a preset (scaled to its depth): its greedy
    tokens are those one window pass predicts."""
    import types

    from qsjax.runtime.generator import Generator

    model, _ = models[name]
    qs = preset("fast", model.cfg.n_layers)
    tokenizer = types.SimpleNamespace(eos_ids=(), pad_id=0, decode=lambda ids: "")
    gen = Generator(model, tokenizer, qs)
    gen.eos_ids = ()
    prompts, N = [rng.integers(2, 96, 13).tolist(), rng.integers(2, 96, 9).tolist()], 5
    result = gen(prompts, max_new_tokens=N)
    assert result.prompt_layers_executed < 1  # the cut-off acted on the prompts
    for prompt, new in zip(prompts, result.token_ids):
        P = len(prompt)
        positions = np.arange(P + N)[None]
        logits = run_window(model, qs, np.array([prompt + new]), positions < P - 1, positions >= P - 1)[0]
        assert logits[0, P - 1:P + N - 1].argmax(-1).tolist() == new


def test_scoring_fast_path_equals_reference(models, rng):
    """Eval's path (`quicksilver_nll`) on gemma3's five layers of two kinds (scanned a period at a time):
    the `fast` preset's structure (dense prefix, decision layer, compacted layer) = the masked reference."""
    from qsjax.quicksilver.decoding.steps import prepare
    from qsjax.quicksilver.window.forward import dense_prefix
    from qsjax.quicksilver.window.scoring import quicksilver_nll

    model, _ = models["gemma3"]
    T, offset = 64, 47
    tokens = rng.integers(2, 96, (2, T)).astype(np.int32)
    lengths = np.array([T, 55], np.int32)
    out = {}
    for compact in (False, True):
        qs = dataclasses.replace(preset("fast", 5), compact=compact)
        prepared = prepare(model, qs)
        out[compact] = jax.jit(lambda s, t, n: quicksilver_nll(qs, prepared.module(s), t, n, offset))(
            prepared.state, tokens, lengths)
    assert dense_prefix(preset("fast", 5), 5) == 3
    scored = np.arange(offset + 1, T)[None, :] < lengths[:, None]
    np.testing.assert_allclose(np.asarray(out[True].nll)[scored], np.asarray(out[False].nll)[scored], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out[True].halt), np.asarray(out[False].halt))
    assert np.asarray(out[False].stats.computing)[-1].sum() < lengths.sum()


@pytest.mark.parametrize("name, layer", [("fast", 25), ("long", 8)])
def test_presets_scale_to_the_models_depth(name, layer):
    """The calibrated layer at 30 layers; elsewhere the same relative depth, always a layer below the
    last one; a one-layer model is refused (and on the command line, one error line)."""
    import argparse

    from qsjax.quicksilver.options import add_quicksilver_args, quicksilver_from_args
    from qsjax.runtime.cli import UsageError

    assert preset(name, 30).halt_cutoff_layer == layer
    got = [preset(name, L).halt_cutoff_layer for L in range(2, 81)]
    assert all(1 <= c <= L - 1 for c, L in zip(got, range(2, 81)))
    assert got == sorted(got) and preset(name, 60).halt_cutoff_layer == 2 * layer
    with pytest.raises(ValueError, match="the model has 1 layer"):
        preset(name, 1)
    p = argparse.ArgumentParser()
    add_quicksilver_args(p)
    with pytest.raises(UsageError, match="QuickSilver options: the model has 1 layer"):
        quicksilver_from_args(p.parse_args(["--quicksilver", name]), 1)
