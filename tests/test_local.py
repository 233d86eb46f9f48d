"""Local attention for far context (`qsjax.quicksilver.mechanisms.local`): what each query sees, what it costs,
and that it changes nothing when the window reaches back past the prompt."""

import dataclasses

import numpy as np
import pytest

from qs_helpers import run_window
from qsjax.quicksilver.settings import QuickSilverConfig

T = 24
CONTEXT = 16  # the first 16 tokens are context (eligible but for the 4 sinks), the rest scored


def masks():
    positions = np.arange(T)[None, :]
    return positions < CONTEXT, positions >= CONTEXT


def test_a_window_past_the_prompt_changes_nothing(tiny_models, rng):
    model, _ = tiny_models["llama-gqa"]
    tokens = rng.integers(0, 96, (2, T))
    plain = QuickSilverConfig(halt="select", select_signal="recency", halt_cutoff_layer=1, keep_top_k=0.5)
    want, _, want_stats, _ = run_window(model, plain, tokens, *masks())
    got, _, stats, _ = run_window(model, dataclasses.replace(plain, local_window=T, local_full=0), tokens, *masks())
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(stats.pairs), np.asarray(want_stats.pairs))


@pytest.mark.parametrize("W,R,P", [(1, 0, 0), (3, 2, 0), (6, 5, 0), (2, 3, 7)])
def test_far_context_sees_its_window_the_sinks_and_the_prefix(W, R, P, tiny_models, rng):
    """Every layer attends exactly the pairs the rule gives (the count is checked against the rule
    written out), far context tokens' states change, and so do the scored tokens' logits (they attend
    to the far tokens' keys), while the last R context tokens and the scored ones still see everything."""
    model, _ = tiny_models["llama-gqa"]
    tokens = rng.integers(0, 96, (2, T))
    qs = QuickSilverConfig(local_window=W, local_full=R, local_prefix=P)
    eligible, needed = masks()
    got, _, stats, _ = run_window(model, qs, tokens, eligible, needed)
    dense = np.asarray(model.logits(tokens))
    e = eligible[0] & (np.arange(T) >= qs.n_sink)  # the sinks are never eligible
    far = e & (np.cumsum(e[::-1])[::-1] > R)  # eligible, not among the last R eligible
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    sees = (j <= i) & (~far[:, None] | (j > i - W) | ~e[None, :] | (j < P))
    assert far.sum() == 12 - R
    np.testing.assert_array_equal(np.asarray(stats.pairs), np.full((2, 2), sees.sum()))
    assert sees.sum() < T * (T + 1) // 2
    assert np.abs(got[:, CONTEXT:] - dense[:, CONTEXT:]).max() > 1e-4
    np.testing.assert_allclose(got[:, :4], dense[:, :4], atol=1e-5, rtol=0)  # the sinks see only sinks


def test_options_are_checked():
    for bad, message in [(dict(local_window=0), "local_window"), (dict(local_full=-1), "local_full"),
                         (dict(local_prefix=-1), "local_prefix"),
                         (dict(local_window=8, scope="all"), "scope=context")]:
        with pytest.raises(ValueError, match=message):
            QuickSilverConfig(**bad)
