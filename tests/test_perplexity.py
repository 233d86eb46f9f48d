"""Windowing protocols (against a plain re-implementation of Hugging Face's loop) and scoring."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsjax.dense.config import ModelConfig
from qsjax.dense.model import Model
from qsjax.dense.modules import Transformer
from qsjax.evaluation.perplexity import Scorer, Window, disjoint_windows, evaluate, make_batches, strided_windows, tail_windows


def hf_strided_loop(n_tokens, max_length, stride):
    """Hugging Face's documented loop on token positions: labels -100 except the last trg_len of
    each window, then the model's loss shifts labels left by one (label 0 of a window is unused).

    -> [(begin, end, [stream positions scored])]"""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        trg_len = end - prev_end
        labels = list(range(begin, end))
        labels[: len(labels) - trg_len] = [-100] * (len(labels) - trg_len)  # target_ids[:, :-trg_len] = -100
        out.append((begin, end, [t for t in labels[1:] if t != -100]))  # shift: labels[1:] vs logits[:-1]
        prev_end = end
        if end == n_tokens:
            break
    return out


GRID = [(n, m, s) for n in (2, 3, 7, 8, 9, 16, 17, 23) for m in (2, 4, 8) for s in (1, 2, 3, 4, 8) if s <= m]


@pytest.mark.parametrize("n, m, s", GRID)
def test_strided_windows_match_hf_loop(n, m, s):
    windows = strided_windows(n, m, s)
    reference = hf_strided_loop(n, m, s)
    assert [(w.begin, w.end) for w in windows] == [(b, e) for b, e, _ in reference]
    for w, (_, _, scored) in zip(windows, reference):
        assert list(range(w.first_scored, w.end)) == scored
    if s < m:  # every token after the first, exactly once
        assert sorted(t for w in windows for t in range(w.first_scored, w.end)) == list(range(1, n))


def test_strided_window_shapes():
    windows = strided_windows(8192, 1024, 512)
    assert len(windows) == 15 and windows[-1].end == 8192
    assert [w.n_scored for w in windows] == [1023] + [512] * 14
    assert {w.offset for w in windows[1:]} == {1024 - 512 - 1}
    tail = strided_windows(1000, 512, 256)[-1]  # after [0, 512), [256, 768): shorter, same offset
    assert (tail.begin, tail.end, tail.first_scored, tail.offset) == (512, 1000, 768, 512 - 256 - 1)


def test_tail_windows_give_every_scored_token_the_same_context():
    windows = tail_windows(100, 40, 16)
    assert [(w.begin, w.end, w.first_scored) for w in windows] == [(0, 40, 24), (16, 56, 40), (32, 72, 56), (48, 88, 72)]
    scored = [t for w in windows for t in range(w.first_scored, w.end)]
    assert scored == list(range(24, 88))  # each once, in order, none before max_length - stride
    assert all(w.length == 40 and w.n_scored == 16 and w.offset == 23 for w in windows)
    with pytest.raises(ValueError):
        tail_windows(100, 40, 40)  # no context left
    with pytest.raises(ValueError):
        tail_windows(30, 40, 16)  # not one full window


def test_disjoint_windows_drop_the_tail():
    windows = disjoint_windows(10, 3)
    assert windows == [Window(0, 3, 1), Window(3, 6, 4), Window(6, 9, 7)]
    assert sum(w.n_scored for w in windows) == 3 * 2
    assert disjoint_windows(6, 3)[-1] == Window(3, 6, 4)


@pytest.mark.parametrize("call", [lambda: strided_windows(10, 4, 5), lambda: strided_windows(10, 4, 0),
                                  lambda: strided_windows(1, 4, 2), lambda: disjoint_windows(5, 6),
                                  lambda: disjoint_windows(5, 1)])  # fmt: skip
def test_bad_window_arguments(call):
    with pytest.raises(ValueError):
        call()


def test_batches_share_an_offset_and_a_length():
    windows = strided_windows(23, 8, 4)  # begins 0, 4, 8, 12 (end 20), 16 (end 23, length 7)
    batches = make_batches(windows, batch_size=3)
    assert [b.key for b in batches] == [(1, 8, 0), (3, 8, 3), (1, 8, 3)]
    stream = np.arange(23)
    for b in batches:
        scored = b.scored()
        assert scored.sum(1).tolist() == [w.n_scored for w in b.windows]
        tokens = b.tokens(stream)
        for row, w in zip(tokens, b.windows):  # targets name the stream tokens the logits predict
            assert row[: w.length].tolist() == list(range(w.begin, w.end))
        assert (b.targets()[scored] == tokens[:, b.offset + 1 :][scored]).all()
    assert make_batches(disjoint_windows(10, 3), 2)[-1].key == (1, 3, 0)


# ---------------------------------------------------------------------------------------------
# Scoring on a tiny random model

CFG = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, head_dim=8, max_positions=64, norm_eps=1e-5)
ARCHS = {
    "llama": ModelConfig(
        arch="llama", n_kv_heads=2, d_ff=64, tie_embeddings=False, attn_bias=False, mlp_bias=False, **CFG
    ),
    "gpt2": ModelConfig(arch="gpt2", n_kv_heads=4, d_ff=128, tie_embeddings=True, attn_bias=True, mlp_bias=True, **CFG),
}


def random_model(cfg: ModelConfig, seed: int = 0) -> Model:
    model = Model.from_module(Transformer(cfg))
    leaves, treedef = jax.tree.flatten(model.state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    return Model(cfg, model.graphdef, jax.tree.unflatten(treedef, leaves))


@pytest.fixture(scope="module", params=list(ARCHS))
def scorer(request):
    return Scorer(random_model(ARCHS[request.param]))


@pytest.fixture(scope="module")
def stream():
    return np.random.default_rng(0).integers(0, 96, 50).astype(np.int32)


def direct_nll(model: Model, tokens: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[next token] from the full logits.  tokens [T] -> [T - 1] float64"""
    logits = np.asarray(model.logits(tokens[None]), np.float64)[0]  # [T, V]
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    return -logp[np.arange(len(tokens) - 1), tokens[1:]]


@pytest.mark.parametrize("offset", [0, 5])
def test_token_nll_matches_full_logits(scorer, stream, offset):
    tokens = stream[:16]
    nll = scorer(tokens[None], offset)[0]
    np.testing.assert_allclose(nll, direct_nll(scorer.model, tokens)[offset:], rtol=1e-5, atol=1e-5)


def test_right_padding_does_not_change_nll(scorer, stream):
    tokens = stream[:11]
    padded = np.concatenate([tokens, np.full(5, 7, np.int32)])
    np.testing.assert_allclose(scorer(padded[None], 3)[0, :7], scorer(tokens[None], 3)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("protocol", ["strided", "disjoint"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_evaluate_matches_direct_computation(scorer, stream, protocol, batch_size):
    windows = strided_windows(len(stream), 16, 6) if protocol == "strided" else disjoint_windows(len(stream), 16)
    result = evaluate(scorer, stream, windows, batch_size, progress=False)
    expected = np.full(len(stream), np.nan)
    for w in windows:  # each window's full logits, then keep its scored tokens
        expected[w.first_scored : w.end] = direct_nll(scorer.model, stream[w.begin : w.end])[
            w.first_scored - w.begin - 1 :
        ]
    scored = ~np.isnan(expected)
    assert result.tokens_scored == scored.sum() == (len(stream) - 1 if protocol == "strided" else 3 * 15)
    np.testing.assert_array_equal(np.isnan(result.token_nll), ~scored)
    np.testing.assert_allclose(result.token_nll[scored], expected[scored], rtol=1e-5, atol=1e-5)
    assert result.nll_mean == pytest.approx(expected[scored].mean(), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.nll_mean))
    assert result.forwards == len(make_batches(windows, batch_size))


def test_each_shape_compiles_once(stream):
    scorer = Scorer(random_model(ARCHS["llama"], seed=1))
    windows = strided_windows(len(stream), 16, 6)
    first = evaluate(scorer, stream, windows, batch_size=4, progress=False)
    assert set(scorer.shapes) == {(1, 16, 0), (4, 16, 9), (2, 16, 9)}  # first window, batches of 4, the rest
    assert first.seconds_compile > 0
    again = evaluate(scorer, stream, windows, batch_size=4, progress=False)
    assert again.seconds_compile == 0 and again.nll_sum == first.nll_sum
