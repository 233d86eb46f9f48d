"""The halting thresholds as arguments of the compiled program (`ThresholdScorer`): the same NLL,
decisions and accounting as a QuickSilverScorer compiled for each setting, from one program."""

import dataclasses

import numpy as np
import pytest

from qsjax.evaluation.perplexity import strided_windows
from qsjax.quicksilver.scorer import QuickSilverScorer, ThresholdScorer, evaluate_quicksilver
from qsjax.quicksilver.settings import QuickSilverConfig


def setting(**fields) -> QuickSilverConfig:
    return QuickSilverConfig(halt="drift", halt_min_layer=1, halt_drift=0.0, halt_entropy=1e9, kv_skip="mask",
                             **fields)


@pytest.mark.parametrize("fields", [dict(scope="all"), dict(scope="context", fuse_threshold=0.5)])
def test_one_program_scores_every_threshold_as_its_own_program_would(tiny_models, rng, fields):
    model, _ = tiny_models["llama-gqa"]
    stream = rng.integers(0, 96, 80).astype(np.int32)
    windows = strided_windows(len(stream), 48, 16)
    base = setting(**fields)
    scorer = ThresholdScorer(model, base)
    halted = []
    for tau_drift, tau_entropy in ((0.0, 1e9), (0.5, 1e9), (0.5, 6.5), (1e9, 1e9)):
        qs = dataclasses.replace(base, halt_drift=tau_drift, halt_entropy=tau_entropy)
        got, got_stats, got_dec = evaluate_quicksilver(scorer.at(qs), stream, windows, progress=False, keep_decisions=9)
        want, want_stats, want_dec = evaluate_quicksilver(QuickSilverScorer(model, qs), stream, windows,
                                                          progress=False, keep_decisions=9)
        np.testing.assert_array_equal(got.token_nll, want.token_nll)
        assert got_dec == want_dec
        assert {k: v for k, v in got_stats.items()} == want_stats
        halted.append(got_stats["tokens_halted"])
    assert halted[0] == 0 < halted[1] and halted[2] < halted[1] < halted[3]  # the grid moves the decisions
    assert len(scorer.shapes) == len({(1, w.length, w.offset) for w in windows})  # compiled once per window shape


def test_only_the_thresholds_may_change(tiny_models):
    model, _ = tiny_models["llama-gqa"]
    scorer = ThresholdScorer(model, setting(scope="all"))
    with pytest.raises(ValueError, match="only halt_drift and halt_entropy"):
        scorer.at(setting(scope="context"))
    with pytest.raises(ValueError, match="needs drift \\+ entropy halting"):
        ThresholdScorer(model, QuickSilverConfig(halt="drift", halt_drift=0.1, halt_entropy=None))
