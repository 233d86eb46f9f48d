"""Changing tokens after position t never changes the logits at positions <= t."""

import numpy as np
import pytest


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama3-rope"])
def test_future_tokens_do_not_change_past_logits(name, tiny_models, rng):
    model, _ = tiny_models[name]
    T = 20
    a = rng.integers(0, model.cfg.vocab_size, (1, T))
    for t in (0, 7, T - 2):
        b = a.copy()
        b[0, t + 1:] = rng.integers(0, model.cfg.vocab_size, T - t - 1)
        la, lb = np.asarray(model.logits(a)), np.asarray(model.logits(b))
        np.testing.assert_array_equal(la[0, : t + 1], lb[0, : t + 1])
        assert not np.allclose(la[0, t + 1:], lb[0, t + 1:])  # the change is visible after t
