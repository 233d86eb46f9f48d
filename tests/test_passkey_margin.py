"""scripts/passkey_margin.py's scorer: one prefill of a left-padded prompt and the answer teacher-forced
through decode steps give the logits and log-probabilities a single causal window over prompt and
answer gives (dense, and QuickSilver with selection and local attention acting)."""

import dataclasses

import jax
import numpy as np
import pytest

from qs_helpers import run_window
from qsjax.quicksilver.settings import preset
from test_benchmarks import script_module

PROMPT, ANSWER, BUCKET = 21, 4, 32  # 11 slots of left padding


def measured(model, qs, prompt, answer):
    """What the script records for one prompt, and the raw (last logits, answer log-probs)."""
    margin = script_module("passkey_margin")
    score = margin.scorer(model, qs, BUCKET + ANSWER)
    tokens = np.zeros((1, BUCKET), np.int32)
    tokens[0, BUCKET - PROMPT:] = prompt
    start = np.array([BUCKET - PROMPT], np.int32)
    z, logp = (np.asarray(a) for a in score(tokens, start, np.asarray(answer, np.int32)))
    return margin.measure(score, list(prompt), list(answer), BUCKET), z, logp


def expected(logits, answer):
    """From a window over prompt + answer, logits [PROMPT + ANSWER, V]: the prompt's last logits and
    log p(answer_i | prompt, answer_<i)."""
    logp = np.asarray(jax.nn.log_softmax(logits[PROMPT - 1:-1], axis=-1))
    return logits[PROMPT - 1], logp[np.arange(ANSWER), answer]


def check(got, z, logp, want_z, want_logp, answer):
    np.testing.assert_allclose(z, want_z, atol=2e-5, rtol=0)
    np.testing.assert_allclose(logp, want_logp, atol=2e-5, rtol=0)
    others = np.delete(want_z, answer[0])
    assert got["margin"] == pytest.approx(want_z[answer[0]] - others.max(), abs=2e-5)
    assert got["top"] == int(np.argmax(want_z))
    assert got["key_logprob"] == pytest.approx(want_logp[1:].sum(), abs=1e-4)


def test_dense_answer_scores_match_one_window(tiny_models, rng):
    model, _ = tiny_models["llama-gqa"]
    seq = rng.integers(0, 96, PROMPT + ANSWER)
    answer = seq[PROMPT:]
    got, z, logp = measured(model, None, seq[:PROMPT], answer)
    check(got, z, logp, *expected(np.asarray(model.logits(seq[None]))[0], answer), answer)


@pytest.mark.parametrize("local", [False, True])
def test_quicksilver_answer_scores_match_one_window(local, tiny_models, rng):
    """The long preset on a six-layer model (selection after layer 2 keeping a quarter, and with local
    attention a 3-slot window): prefill and teacher-forced decode == one window whose context is the
    prompt but its last token (the scope the prefill uses), the rest needed."""
    model, _ = tiny_models["llama-deep"]
    qs = dataclasses.replace(preset("long", 6), keep_top_k=0.25, select_min_keep=1, select_queries=2)
    if local:
        qs = dataclasses.replace(qs, local_window=3, local_full=2, local_prefix=2)
    seq = rng.integers(0, 96, PROMPT + ANSWER)
    answer = seq[PROMPT:]
    context = np.arange(PROMPT + ANSWER) < PROMPT - 1
    logits, _, stats, _ = run_window(model, qs, seq[None], context[None], ~context[None])
    assert int(np.asarray(stats.computing)[-1, 0]) < PROMPT + ANSWER  # the mechanisms acted
    got, z, logp = measured(model, qs, seq[:PROMPT], answer)
    check(got, z, logp, *expected(logits[0], answer), answer)
    dense = np.asarray(model.logits(seq[None]))[0]
    assert np.abs(z - dense[PROMPT - 1]).max() > 1e-4  # ... and changed the answer's logits
