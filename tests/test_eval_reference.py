"""qsjax's perplexity of the default model against Hugging Face transformers' on the first 8,192
tokens of WikiText-103 test, under both protocols.

The reference is PyTorch float32 reading the same GGUF file through transformers' own GGUF loader
(`from_pretrained(dir, gguf_file=...)`), not qsjax's conversion of it, and scoring with the loops
of Hugging Face's "Perplexity of fixed-length models" guide (labels -100 outside the scored tokens)
and of GPTQ. Both sides weight every scored token equally: the sum of NLLs over the tokens scored.
(The guide weights each window's mean loss by `valid labels - 1`, which undercounts every window
after the first by one token: the loss shifts labels by one, but a window's first label is -100
there anyway. Here each window's mean loss is weighted by the labels it actually averaged.)

Runtime on two CPU cores: about two to three minutes (15 + 4 windows in each framework).
"""

import math
import time

import numpy as np
import pytest

from qsjax.evaluation.data import DataError, read_text, resolve_data, tokenize

pytestmark = pytest.mark.slow

N_TOKENS = 8192
TOLERANCE = 0.01  # absolute, on perplexity


@pytest.fixture(scope="session")
def reference_setup():
    """(model directory, GGUF path, the first 8,192 tokens) or a skip."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qsjax.checkpoints.tokenizer import load_tokenizer
    from qsjax.weights import gguf_path, resolve_model

    try:
        text = read_text(resolve_data("wikitext103"))
    except DataError as e:
        pytest.skip(f"WikiText-103 test text not available: {e}")
    model_dir = resolve_model(None)
    gguf = gguf_path(model_dir)
    if gguf is None:
        pytest.skip(f"{model_dir} keeps no GGUF file to load in transformers")
    stream = tokenize(load_tokenizer(model_dir), text, N_TOKENS)
    assert len(stream) == N_TOKENS
    return model_dir, gguf, stream


@pytest.fixture(scope="session")
def qsjax_scorer(reference_setup):
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.evaluation.perplexity import Scorer

    return Scorer(load_model(reference_setup[0], "float32"))


@pytest.fixture(scope="session")
def hf_model(reference_setup):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, gguf, _ = reference_setup
    return AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf.name, dtype=torch.float32).eval()


def hf_strided_perplexity(model, ids: np.ndarray, max_length: int, stride: int) -> tuple[float, int]:
    """Hugging Face's strided loop, token-weighted.  -> (perplexity, tokens scored)"""
    import torch

    input_all = torch.as_tensor(ids, dtype=torch.long)[None]
    seq_len = input_all.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end  # may differ from stride on the last window
        input_ids = input_all[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss  # mean over the labels left after the shift
        n_loss = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * n_loss
        n_tokens += n_loss
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def hf_disjoint_perplexity(model, ids: np.ndarray, seqlen: int) -> tuple[float, int]:
    """GPTQ's loop: floor(N / seqlen) windows, every token but each window's first scored."""
    import torch

    input_all = torch.as_tensor(ids, dtype=torch.long)[None]
    nll_sum, n_tokens = 0.0, 0
    for i in range(input_all.size(1) // seqlen):
        batch = input_all[:, i * seqlen : (i + 1) * seqlen]
        with torch.no_grad():
            loss = model(batch, labels=batch).loss
        nll_sum += loss.item() * (seqlen - 1)
        n_tokens += seqlen - 1
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("protocol", ["strided", "disjoint"])
def test_perplexity_matches_transformers(reference_setup, qsjax_scorer, hf_model, protocol):
    from qsjax.evaluation.perplexity import disjoint_windows, evaluate, strided_windows

    stream = reference_setup[2]
    t0 = time.perf_counter()
    if protocol == "strided":
        windows = strided_windows(len(stream), 1024, 512)
        hf_ppl, hf_tokens = hf_strided_perplexity(hf_model, stream, 1024, 512)
    else:
        windows = disjoint_windows(len(stream), 2048)
        hf_ppl, hf_tokens = hf_disjoint_perplexity(hf_model, stream, 2048)
    hf_seconds = time.perf_counter() - t0
    result = evaluate(qsjax_scorer, stream, windows, progress=False)
    print(
        f"\n{protocol}: perplexity qsjax {result.perplexity:.5f}, transformers {hf_ppl:.5f} "
        f"({result.tokens_scored} tokens; {result.seconds:.1f} s + {result.seconds_compile:.1f} s compiling, "
        f"transformers {hf_seconds:.1f} s)"
    )
    assert result.tokens_scored == hf_tokens == (N_TOKENS - 1 if protocol == "strided" else 4 * 2047)
    assert abs(result.perplexity - hf_ppl) < TOLERANCE, (result.perplexity, hf_ppl)
