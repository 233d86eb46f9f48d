"""QuickSilver in generation: prompt prefill + cached decoding equals one pass over the whole sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qs_helpers import run_window
from qsjax.quicksilver.options import add_quicksilver_args, quicksilver_from_args
from qsjax.quicksilver.settings import QuickSilverConfig, preset
from qsjax.quicksilver.decoding.steps import prepare, quicksilver_prefill

from test_quicksilver_forward import MECHANISMS

SETTINGS = {
    "cutoff-propagate": QuickSilverConfig(halt="cutoff", halt_cutoff_layer=1, kv_skip="propagate"),
    "cutoff-mask": QuickSilverConfig(halt="cutoff", halt_cutoff_layer=1, kv_skip="mask"),
    "cutoff-zero": QuickSilverConfig(halt="cutoff", halt_cutoff_layer=1, kv_skip="zero"),
    "attention-select": QuickSilverConfig(halt="select", halt_cutoff_layer=1, keep_top_k=0.5, select_queries=4),
    "attention-select-local": QuickSilverConfig(halt="select", halt_cutoff_layer=1, keep_top_k=0.5, select_queries=4,
                                                local_window=3, local_full=4),
    "drift": QuickSilverConfig(halt="drift", halt_drift=0.9, halt_entropy=6.555),
    "fusion": QuickSilverConfig(fuse_threshold=0.2),
    "amq": QuickSilverConfig(amq_layer=2, amq_low=6.54, amq_high=6.56),
    # scope=all: generated tokens halt, fuse and pick widths in decode too
    **{f"all-{name}": qs for name, qs in MECHANISMS.items() if qs.scope == "all"},
    "all-fusion-propagate": QuickSilverConfig(scope="all", halt="drift", halt_drift=0.9, halt_entropy=None,
                                              kv_skip="propagate", fuse_threshold=0.3),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_prefill_then_decode_equals_one_pass(name, tiny_models, rng):
    """Prompt prefill + one-token decode steps give the logits and decisions of one window pass over
    the whole sequence (two rows, so that a decode step may run only some of them)."""
    from qsjax.quicksilver.decoding.decode import quicksilver_decode_step

    model, _ = tiny_models["llama-gqa"]
    qs = SETTINGS[name]
    B, P, N = 2, 16, 8
    seq = rng.integers(0, 96, (B, P + N))
    positions = np.arange(P + N)[None, :].repeat(B, 0)
    eligible = positions < (P + N if qs.scope == "all" else P - 1)
    full, tok_full, _, _ = run_window(model, qs, seq, eligible, needed=positions >= P - 1)
    halt_full, fused_full, bits_full = (np.asarray(a) for a in (tok_full.halt, tok_full.fused, tok_full.bits))

    prepared = prepare(model, qs)
    p = jax.jit(lambda s, t: quicksilver_prefill(qs, prepared.module(s), t, jnp.zeros(B, jnp.int32), 32))(
        prepared.state, jnp.asarray(seq[:, :P]))
    logits, state, tok = p.logits, p.state, p.tokens
    np.testing.assert_array_equal(np.asarray(tok.halt), halt_full[:, :P])
    np.testing.assert_array_equal(np.asarray(tok.fused)[:, :P - 1], fused_full[:, :P - 1])
    np.testing.assert_allclose(np.asarray(logits), full[:, P - 1], atol=1e-5)
    if qs.scope == "all":
        step = jax.jit(lambda s, c, t: quicksilver_decode_step(qs, prepared.module(s), c, t))
    else:
        step = jax.jit(lambda s, c, t: c.decode_step(prepared.module(s), t) + (None,))
    for i in range(N - 1):
        logits, state, decided = step(prepared.state, state, jnp.asarray(seq[:, P + i]))
        np.testing.assert_allclose(np.asarray(logits), full[:, P + i], atol=1e-5)
        if decided is not None:
            np.testing.assert_array_equal(np.asarray(decided.halt), halt_full[:, P + i])
            np.testing.assert_array_equal(np.asarray(decided.bits), bits_full[:, P + i])
            np.testing.assert_array_equal(np.asarray(decided.prev_fused), fused_full[:, P + i - 1])
    if qs.scope == "all":  # the setting does act on generated tokens
        acted = (halt_full[:, P:] < 2).any() | fused_full[:, P:].any() | (bits_full[:, P:] < 8).any()
        assert acted


def parse(*argv):
    import argparse

    p = argparse.ArgumentParser()
    add_quicksilver_args(p)
    return quicksilver_from_args(p.parse_args(list(argv)), n_layers=30)


def test_cli_flags_build_the_config():
    assert parse() == QuickSilverConfig()
    assert not parse().enabled
    assert parse("--quicksilver", "paper") == preset("paper", 30)
    assert parse("--quicksilver", "fast").scope == "context"
    qs = parse("--halt-cutoff-layer", "20", "--kv-skip", "propagate")
    assert (qs.halt, qs.halt_cutoff_layer, qs.kv_skip) == ("cutoff", 20, "propagate")
    assert parse("--halt-cutoff-layer", "6", "--keep-top-k", "0.5").halt == "select"
    assert parse("--halt-entropy", "2.0").halt == "drift"
    assert parse("--quicksilver", "paper", "--no-entropy-test").halt_entropy is None
    qs = parse("--halt-cutoff-layer", "10", "--select-pool", "7", "--select-pool-kind", "avg", "--select-heads", "max",
               "--select-accumulate", "--select-recent", "64", "--select-queries", "8", "--halt-cutoff-layer2", "20",
               "--keep-top-k2", "0.25")
    assert qs == QuickSilverConfig(halt="select", halt_cutoff_layer=10, select_pool=7, select_pool_kind="avg",
                                   select_heads="max", select_accumulate=True, select_recent=64, select_queries=8,
                                   halt_cutoff_layer2=20, keep_top_k2=0.25)
    assert parse("--halt-cutoff-layer", "10", "--select-recent", "8").halt == "select"  # any selection flag implies it
    local = parse("--quicksilver", "long", "--local-window", "256", "--local-full", "64")
    assert (local.local_window, local.local_full, local.halt) == (256, 64, "select") and local.enabled
    assert parse("--local-window", "8").enabled  # local attention alone
    share = parse("--halt-cutoff-layer", "10", "--select-recent", "0.7").select_recent
    assert (share, type(qs.select_recent)) == (0.7, int)  # a share of the budget; a whole number stays a count


@pytest.mark.parametrize("argv, message", [
    (("--halt-cutoff-layer", "31"), "--halt-cutoff-layer 31"),
    (("--keep-top-k", "1.5", "--halt-cutoff-layer", "3"), "--keep-top-k"),
    (("--scope", "all", "--keep-top-k", "0.5", "--halt-cutoff-layer", "3"), "needs --scope context"),
    (("--amq-layer", "0"), "--amq-layer must be >= 1, got 0"),
    (("--halt", "cutoff",), "needs --halt-cutoff-layer"),
    (("--halt-cutoff-layer", "3", "--select-pool", "4"), "--select-pool must be 0, 1 or an odd window, got 4"),
    (("--halt-cutoff-layer", "3", "--select-recent", "-1"), "--select-recent must be >= 0, got -1"),
    (("--halt-cutoff-layer", "3", "--select-recent", "2.5"), "--select-recent must be a count .* or a share"),
    (("--halt-cutoff-layer", "3", "--keep-top-k2", "0.2"), "--halt-cutoff-layer2 and --keep-top-k2 go together"),
    (("--halt-cutoff-layer", "3", "--halt-cutoff-layer2", "3", "--keep-top-k2", "0.2"),
     "--halt-cutoff-layer2 3 must be after --halt-cutoff-layer 3"),
    (("--halt-cutoff-layer", "3", "--halt-cutoff-layer2", "5", "--keep-top-k2", "0.6"),
     r"--keep-top-k2 0.6 must be in \(0, --keep-top-k 0.5\)"),
    (("--halt-cutoff-layer", "3", "--halt-cutoff-layer2", "31", "--keep-top-k2", "0.2"),
     "--halt-cutoff-layer2 31 but the model has 30 layers"),
    (("--halt-cutoff-layer", "3", "--select-signal", "recency", "--select-accumulate"),
     "--select-pool shape the attention signal: they need --select-signal attention"),
    (("--local-window", "0"), "--local-window must be >= 1"),
    (("--local-full", "-2"), "--local-full must be >= 0"),
    (("--scope", "all", "--local-window", "8"), "local attention needs --scope context"),
    (("--select-pool", "3",), r"--halt select \(implied by --select-pool\) needs --halt-cutoff-layer >= 1"),
])
def test_cli_flag_errors(argv, message):
    from qsjax.runtime.cli import UsageError

    with pytest.raises(UsageError, match=message):
        parse(*argv)


@pytest.mark.parametrize("name", ["fast", "recency", "fusion", "all-drift", "all-fusion-propagate"])
def test_generator_equals_the_window_pass(name, tiny_models, rng):
    """`Generator` under QuickSilver (its compiled prefill, decode steps and carried state, with
    left-padded prompts of different lengths) makes the greedy tokens that one window pass over each
    prompt + continuation predicts, with the same prompt decisions."""
    import types

    from qsjax.runtime.generator import Generator

    model, _ = tiny_models["llama-deep"]
    qs = {"fast": preset("fast", 6),
          "recency": QuickSilverConfig(halt="select", select_signal="recency", halt_cutoff_layer=3, keep_top_k=0.5),
          "fusion": QuickSilverConfig(fuse_threshold=0.2, halt_min_layer=2),
          "all-drift": QuickSilverConfig(scope="all", halt="drift", halt_drift=0.9, halt_entropy=6.555),
          "all-fusion-propagate": SETTINGS["all-fusion-propagate"]}[name]
    tokenizer = types.SimpleNamespace(eos_ids=(), pad_id=0, decode=lambda ids: "")
    gen = Generator(model, tokenizer, qs)
    gen.eos_ids = ()  # exactly N new tokens
    prompts = [rng.integers(2, 96, 13).tolist(), rng.integers(2, 96, 9).tolist()]
    N = 6
    result = gen(prompts, max_new_tokens=N)
    assert result.prompt_layers_executed is not None
    assert gen.compacts == (qs.scope == "context")  # scope=context decodes on the compacted cache
    for prompt, new in zip(prompts, result.token_ids):
        P = len(prompt)
        seq = np.array([prompt + new])
        positions = np.arange(P + N)[None]
        eligible = positions < (P + N if qs.scope == "all" else P - 1)
        logits, _, _, _ = run_window(model, qs, seq, eligible, needed=positions >= P - 1)
        assert logits[0, P - 1:P + N - 1].argmax(-1).tolist() == new
    if qs.scope == "context":
        assert result.prompt_layers_executed < 1  # the prompt's mechanisms did act
