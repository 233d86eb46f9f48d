"""Logits parity with Hugging Face transformers (PyTorch) on tiny random models, padded batches."""

import numpy as np
import pytest
import torch

from conftest import TINY


def hf_logits(hf, tokens, start):
    """transformers logits for a left-padded batch (positions restart at each row's first token)."""
    B, T = tokens.shape
    mask = (np.arange(T)[None, :] >= start[:, None]).astype(np.int64)
    positions = np.maximum(np.arange(T)[None, :] - start[:, None], 0)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    return out.logits.float().numpy(), mask.astype(bool)


@pytest.mark.parametrize("name", list(TINY))
def test_padded_batch_logits_match_transformers(name, tiny_models, rng):
    model, hf = tiny_models[name]
    T = 24
    tokens = rng.integers(0, model.cfg.vocab_size, (3, T))
    start = np.array([0, 5, 17])
    ours = np.asarray(model.logits(tokens, start))
    ref, valid = hf_logits(hf, tokens, start)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref)[valid].max() <= 1e-4


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_padding_does_not_change_a_row(name, tiny_models, rng):
    """A row's logits are the same alone and left-padded inside a batch."""
    model, _ = tiny_models[name]
    tokens = rng.integers(0, model.cfg.vocab_size, (1, 10))
    alone = np.asarray(model.logits(tokens))[0]
    padded = np.concatenate([np.full((1, 6), 3), tokens], axis=1)
    inside = np.asarray(model.logits(padded, np.array([6])))[0, 6:]
    np.testing.assert_allclose(inside, alone, atol=1e-5)


def test_bfloat16_is_close(tiny_dirs, rng):
    from qsjax.checkpoints.hf_params import load_model

    path, hf = tiny_dirs["llama-gqa"]
    tokens = rng.integers(0, 96, (2, 16))
    ref = np.asarray(load_model(path).logits(tokens))
    low = load_model(path, "bfloat16")
    assert low.dtype == np.dtype("bfloat16")
    out = np.asarray(low.logits(tokens))
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_long_padded_window_matches_transformers(tiny_models, rng):
    """Windows longer than the attention block (128) take the blocked causal path."""
    model, hf = tiny_models["llama-gqa"]
    T = 300
    tokens = rng.integers(0, model.cfg.vocab_size, (2, T))
    start = np.array([0, 41])
    ours = np.asarray(model.logits(tokens, start))
    ref, valid = hf_logits(hf, tokens, start)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
