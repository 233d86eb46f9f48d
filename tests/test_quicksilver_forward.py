"""Invariants of the QuickSilver reference forward pass, for every mechanism."""

import numpy as np
import pytest

from qs_helpers import executed_fraction, run_window
from qsjax.quicksilver.settings import QuickSilverConfig, preset

T = 24

# settings that do act on a tiny random 2-layer model (checked below: something is skipped or changed)
MECHANISMS = {
    "drift": QuickSilverConfig(scope="all", halt="drift", halt_drift=0.9, halt_entropy=6.555, kv_skip="mask"),
    "drift-zero": QuickSilverConfig(scope="all", halt="drift", halt_drift=0.9, halt_entropy=None, kv_skip="zero"),
    "cutoff-propagate": QuickSilverConfig(scope="all", halt="cutoff", halt_cutoff_layer=1, kv_skip="propagate"),
    "cutoff-mask": QuickSilverConfig(scope="all", halt="cutoff", halt_cutoff_layer=1, kv_skip="mask"),
    "recency": QuickSilverConfig(scope="context", halt="select", select_signal="recency", halt_cutoff_layer=1, keep_top_k=0.5),
    "recency-local": QuickSilverConfig(scope="context", halt="select", select_signal="recency", halt_cutoff_layer=1,
                                       keep_top_k=0.5, local_window=5, local_full=3),
    "fusion": QuickSilverConfig(scope="all", fuse_threshold=0.2),
    "amq": QuickSilverConfig(scope="all", amq_layer=2, amq_low=6.54, amq_high=6.56),
}


def test_all_off_is_identical_to_dense(tiny_models, rng):
    for name in ("gpt2", "llama-gqa"):
        model, _ = tiny_models[name]
        tokens = rng.integers(0, 96, (2, T))
        logits, tok, stats, _ = run_window(model, QuickSilverConfig(), tokens)
        # same math; the dense pass unrolls short windows and QuickSilver scans, so only rounding differs
        np.testing.assert_allclose(logits, np.asarray(model.logits(tokens)), atol=1e-5, rtol=0)
        assert executed_fraction(stats, 2 * T) == 1.0


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_mechanism_acts(name, tiny_models, rng):
    """Each setting does what it is for: halting leaves fewer token-layers, fusion retires tokens,
    Matryoshka quantization narrows weights, and each only that."""
    model, _ = tiny_models["llama-gqa"]
    tokens = rng.integers(0, 96, (2, T))
    eligible = np.arange(T)[None, :].repeat(2, 0) < 16
    logits, tok, stats, _ = run_window(model, MECHANISMS[name], tokens, eligible)
    fused, narrowed = np.asarray(tok.fused).any(), (np.asarray(tok.bits) < 8).any()
    if name == "fusion":  # every prediction is read here: retired tokens compute on for themselves
        assert fused and not narrowed
    elif name == "amq":
        assert narrowed and executed_fraction(stats, 2 * T) == 1 and not fused
    else:  # halting policies
        assert executed_fraction(stats, 2 * T) < 1 and not fused and not narrowed
    assert not np.asarray(tok.fused)[:, :4].any() and (np.asarray(tok.halt)[:, :4] == 2).all()  # sinks untouched


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_causality(name, tiny_models, rng):
    """Changing tokens after t never changes logits at positions <= t, for the positions whose logits
    are needed (all of them under scope=all, where every token, later ones included, may halt or fuse;
    those after the context under scope=context)."""
    model, _ = tiny_models["llama-gqa"]
    qs = MECHANISMS[name]
    a = rng.integers(0, 96, (1, T))
    first_needed = 0 if qs.scope == "all" else 16
    eligible = np.arange(T)[None, :] < (T if qs.scope == "all" else 16)
    needed = np.arange(T)[None, :] >= first_needed
    la, _, _, _ = run_window(model, qs, a, eligible, needed)
    for t in (5, 11, 17, 20):
        b = a.copy()
        b[0, t + 1:] = rng.integers(0, 96, T - t - 1)
        lb, _, _, _ = run_window(model, qs, b, eligible, needed)
        np.testing.assert_array_equal(la[0, first_needed: t + 1], lb[0, first_needed: t + 1])


def test_scope_context_leaves_needed_tokens_alone(tiny_models, rng):
    model, _ = tiny_models["llama-gqa"]
    tokens = rng.integers(0, 96, (1, T))
    eligible = np.arange(T)[None, :] < 16
    qs = QuickSilverConfig(scope="context", halt="cutoff", halt_cutoff_layer=1, kv_skip="propagate", fuse_threshold=0.2)
    _, tok, _, _ = run_window(model, qs, tokens, eligible)
    halt, fused = np.asarray(tok.halt)[0], np.asarray(tok.fused)[0]
    assert (halt[16:] == 2).all() and not fused[16:].any()
    assert (halt[4:16] == 1).all()


def test_more_permissive_thresholds_skip_more(tiny_models, rng):
    model, _ = tiny_models["llama-gqa"]
    tokens = rng.integers(0, 96, (2, T))
    fractions = []
    for tau in (0.0, 0.3, 0.45, 1.0, 10.0):
        qs = QuickSilverConfig(scope="all", halt="drift", halt_drift=tau, halt_entropy=None)
        fractions.append(executed_fraction(run_window(model, qs, tokens)[2], 2 * T))
    assert fractions[0] == 1.0 and fractions[-1] < 1.0
    assert all(a >= b for a, b in zip(fractions, fractions[1:])), fractions
    fractions = []
    for tau in (0.0, 6.53, 6.555, 100.0):
        qs = QuickSilverConfig(scope="all", halt="drift", halt_drift=None, halt_entropy=tau)
        fractions.append(executed_fraction(run_window(model, qs, tokens)[2], 2 * T))
    assert fractions[0] == 1.0 and fractions[-1] < 1.0
    assert all(a >= b for a, b in zip(fractions, fractions[1:])), fractions


def test_zero_keys_take_softmax_mass_but_mask_does_not(tiny_models, rng):
    """mask and zero differ for the tokens that attend to halted ones; propagate in the layer right
    above the halt is exact (its K/V come from the same state a dense pass uses)."""
    model, _ = tiny_models["llama-gqa"]
    tokens = rng.integers(0, 96, (1, T))
    eligible = np.arange(T)[None, :] < 16
    dense = np.asarray(model.logits(tokens))
    out = {}
    for mode in ("mask", "zero", "propagate"):
        qs = QuickSilverConfig(scope="context", halt="cutoff", halt_cutoff_layer=1, kv_skip=mode)
        out[mode] = run_window(model, qs, tokens, eligible)[0]
    np.testing.assert_allclose(out["propagate"][0, 16:], dense[0, 16:], atol=1e-5)
    assert np.abs(out["mask"][0, 16:] - dense[0, 16:]).max() > 1e-3
    assert np.abs(out["zero"][0, 16:] - out["mask"][0, 16:]).max() > 1e-3


@pytest.mark.parametrize("name", list(MECHANISMS) + ["attention-select"])
@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
def test_compacted_path_equals_masked_reference(name, arch, tiny_models, rng):
    """Bucketed compaction gives the reference's decisions and logits (float32, 1e-5), with a
    right-padded row and more tokens than the smallest bucket."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from qsjax.dense.blocks import lm_logits
    from qsjax.dense.model import Layout
    from qsjax.quicksilver.decoding.steps import prepare
    from qsjax.quicksilver.window.forward import quicksilver_window

    qs = MECHANISMS.get(name) or QuickSilverConfig(halt="select", halt_cutoff_layer=1, keep_top_k=0.3)
    model, _ = tiny_models[arch]
    T = 160
    tokens = jnp.asarray(rng.integers(0, 96, (2, T)))
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    valid = positions < jnp.array([[T], [120]])
    eligible = positions < 130
    out = {}
    for compact in (False, True):
        setting = dataclasses.replace(qs, compact=compact)
        prepared = prepare(model, setting)
        w = Layout.of(model.cfg, positions, valid)
        res = jax.jit(lambda s: quicksilver_window(setting, prepared.module(s), tokens, w, eligible,
                                                   positions >= 100))(prepared.state)
        out[compact] = np.asarray(lm_logits(prepared.module(), res.x)), res.tokens, res.layers.stats
    v = np.asarray(valid)
    np.testing.assert_allclose(out[True][0][v], out[False][0][v], atol=1e-5)
    for field in ("halt", "fused", "bits", "active"):
        np.testing.assert_array_equal(np.asarray(getattr(out[True][1], field)), np.asarray(getattr(out[False][1], field)))
    np.testing.assert_array_equal(np.asarray(out[True][2].computing), np.asarray(out[False][2].computing))


# settings with the structure the presets ship on a 6-layer model: plain layers below the first
# decision, a decision layer, compacted layers above (and a Matryoshka segment split)
DEEP = {
    "fast": preset("fast", 6),  # cut-off after layer 5: 4 plain layers, the decision layer, 1 compacted
    "recency-3": QuickSilverConfig(halt="select", select_signal="recency", halt_cutoff_layer=3, keep_top_k=0.25),
    "attention-2": QuickSilverConfig(halt="select", halt_cutoff_layer=2, keep_top_k=0.4, select_queries=8),
    "attention-3-local": QuickSilverConfig(halt="select", halt_cutoff_layer=3, keep_top_k=0.4, select_queries=8,
                                           local_window=9, local_full=12),  # local attention in the plain layers too
    "cutoff-propagate-span": QuickSilverConfig(halt="cutoff", halt_cutoff_layer=2, kv_skip="propagate", kv_propagate_span=2),
    "cutoff-fusion-amq": QuickSilverConfig(halt="cutoff", halt_cutoff_layer=4, fuse_threshold=0.2, halt_min_layer=2,
                                           amq_layer=3, amq_low=6.54, amq_high=6.56),
}


@pytest.mark.parametrize("name", list(DEEP))
def test_shipped_structure_equals_masked_reference(name, tiny_models, rng):
    """On 6 layers, the fast path (dense prefix, decision layer, compacted layers) scores like the
    masked reference: the same NLL within 1e-5, decisions and per-layer token counts, over right-padded
    windows whose context (scope=context) is most of the window."""
    import dataclasses

    import jax

    from qsjax.quicksilver.decoding.steps import prepare
    from qsjax.quicksilver.window.scoring import quicksilver_nll
    from qsjax.quicksilver.window.forward import dense_prefix

    model, _ = tiny_models["llama-deep"]
    T, offset = 64, 47
    tokens = rng.integers(0, 96, (2, T)).astype(np.int32)
    lengths = np.array([T, 55], np.int32)
    out = {}
    for compact in (False, True):
        qs = dataclasses.replace(DEEP[name], compact=compact)
        prepared = prepare(model, qs)
        out[compact] = jax.jit(lambda s, t, n: quicksilver_nll(qs, prepared.module(s), t, n, offset))(
            prepared.state, tokens, lengths)
    assert dense_prefix(DEEP[name], 6) > 0 or name == "attention-2"
    ref, fast = out[False], out[True]
    scored = np.arange(offset + 1, T)[None, :] < lengths[:, None]
    np.testing.assert_allclose(np.asarray(fast.nll)[scored], np.asarray(ref.nll)[scored], atol=1e-5)
    for field in ("halt", "fused", "bits", "eligible"):
        np.testing.assert_array_equal(np.asarray(getattr(fast, field)), np.asarray(getattr(ref, field)))
    np.testing.assert_array_equal(np.asarray(fast.stats.computing), np.asarray(ref.stats.computing))
    np.testing.assert_array_equal(np.asarray(fast.stats.pairs), np.asarray(ref.stats.pairs))
    assert np.asarray(ref.stats.computing)[-1].sum() < lengths.sum()  # the setting does act
