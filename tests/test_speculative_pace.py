"""When speculation drafts (`speculative.adapt`, `Speculation.can_pay`): prompt lookup's drafts are
judged through plain steps (the shadow) before any verify pass; a model drafter that cannot pay at
the best acceptance never drafts."""

import jax.numpy as jnp
import numpy as np
import pytest

from qsjax.runtime.generator import Generator
from qsjax.speculative.adapt import Pace, Shadow
from qsjax.speculative.settings import BEST_ACCEPTANCE, Speculation, expected_accepted
from test_speculative import prompts, tokenizer


def follow(shadow, drafts, n, tokens, live=(True, True)):
    """Plain steps emitting tokens[t] [B] in turn; -> the shadow, and (step, row, a) for each run that ended."""
    ended_runs = []
    for t, token in enumerate(tokens):
        shadow, ended, a = shadow.step(jnp.asarray(drafts), jnp.asarray(n), jnp.asarray(token), jnp.asarray(live))
        ended_runs += [(t, b, int(a[b])) for b in np.flatnonzero(np.asarray(ended))]
    return shadow, ended_runs


def test_shadow_counts_what_a_verify_pass_would_accept():
    """Row 0's drafts come true twice, then a miss: a = 2, at the third step. Row 1's three drafts all
    come true: a = 3 as soon as the third does; the run after it follows the drafts of that step."""
    drafts = [[5, 6, 7], [8, 9, 4]]
    shadow, ended = follow(Shadow.empty(2, 3), drafts, [3, 3], [[5, 8], [6, 9], [1, 4]])
    assert ended == [(2, 0, 2), (2, 1, 3)]
    assert np.asarray(shadow.n).tolist() == [0, 0]
    # a row that matched nothing ends at once; a row without drafts follows nothing
    shadow, ended = follow(Shadow.empty(2, 3), drafts, [3, 0], [[1, 8]])
    assert ended == [(0, 0, 0)] and np.asarray(shadow.n).tolist() == [0, 0]
    # a row that stopped generating is left alone
    shadow, ended = follow(Shadow.empty(2, 3), drafts, [3, 3], [[5, 8]], live=(False, True))
    assert ended == [] and np.asarray(shadow.n).tolist() == [0, 3] and np.asarray(shadow.matched).tolist() == [0, 1]


def test_lookup_verifies_only_on_evidence():
    """Prompt lookup starts at E = 0: a chance alone does not verify; a run followed through plain steps
    that matched enough to lift E to the threshold does, and one that missed does not."""
    threshold, B, K = 1.0, 1, 4
    pace = Pace.start(B, K, threshold, lookup=True)
    drafts, n = jnp.asarray([[5, 6, 7, 8]]), jnp.asarray([4])
    assert not pace.verifies(n)
    step = lambda p, token: p.after(jnp.asarray(False), jnp.float32(0), drafts, n, jnp.asarray([token]),
                                    jnp.asarray([True]))
    missed = step(pace, 9)
    assert not missed.verifies(n) and float(missed.expected) == 0.0
    one = step(pace, 5)
    assert not one.verifies(n)  # E would be 0.5 with a = 1
    two = step(one, 6)
    assert two.verifies(n)  # E would reach 1.0 with a = 2
    assert not two.verifies(jnp.asarray([0]))  # no drafts now: nothing to verify
    # a model drafter tries its first drafts without evidence
    assert Pace.start(B, K, threshold, lookup=False).verifies(n)


def test_can_pay_at_the_best_acceptance(tiny_models):
    """A model drafter pays only if drafts accepted at BEST_ACCEPTANCE each would outweigh its cost;
    prompt lookup whenever K accepted drafts would."""
    cfg = tiny_models["llama-deep"][0].cfg
    assert expected_accepted(0.5, 3) == pytest.approx(0.875)
    exit_ = Speculation("exit", 4, exit_layer=cfg.n_layers - 1)
    assert exit_.threshold(cfg) > expected_accepted(BEST_ACCEPTANCE, 4) and not exit_.can_pay(cfg)
    cheap = Speculation("exit", 4, exit_layer=1, break_even=0.0)  # a drafter reading little of the weights
    assert cheap.threshold(cfg) < expected_accepted(BEST_ACCEPTANCE, 4) and cheap.can_pay(cfg)
    assert Speculation("lookup", 4, break_even=3.9).can_pay(cfg)
    assert not Speculation("lookup", 4, break_even=4.0).can_pay(cfg)


def test_a_drafter_that_cannot_pay_decodes_plainly(tiny_models, rng):
    """The same tokens as plain decoding, no pass verified, and the report says can_pay false."""
    model, _ = tiny_models["llama-deep"]
    spec = Speculation("exit", 4, exit_layer=model.cfg.n_layers - 1)
    assert not spec.can_pay(model.cfg)
    ids = prompts(rng, model.cfg.vocab_size)
    want = Generator(model, tokenizer())(ids, max_new_tokens=12)
    got = Generator(model, tokenizer(), speculation=spec)(ids, max_new_tokens=12)
    assert got.token_ids == want.token_ids
    assert got.speculation["can_pay"] is False and got.speculation["verify_steps"] == 0
