"""Self-drafting with the model's own layers: the search's agreement is the decode loop's one-draft
acceptance, position by position; the search is deterministic; the stored set round-trips and a
missing or damaged store is one clear error; greedy output with the set (API and CLI) is plain greedy."""

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest

from qsjax.dense.model import Sublayers, run_step
from qsjax.runtime.generator import Generator
from qsjax.speculative.search import MAX_K, accepted_runs, search, sublayer_mask, sublayer_set
from qsjax.speculative.settings import Speculation, format_sublayers, parse_sublayers
from qsjax.speculative.store import COMMAND, FILE, StoreError, load_skip, store_json

from conftest import save_tiny_llama_with_tokenizer


def one_draft_agreement(model, tokens, skip: Sublayers):
    """[B, T] bool, straight from the decode loop's parts: for each position t, the prefix x_<t
    prefilled by the full model (left-padded), then the drafter's one-token `run_step` with `skip`
    at x_t; its argmax against the full model's."""
    B, T = tokens.shape
    rows = np.zeros((B * T, T), np.int32)
    start = np.zeros(B * T, np.int32)
    for b in range(B):
        for t in range(T):
            rows[b * T + t, T - t:] = tokens[b, :t]
            start[b * T + t] = T - t
    _, cache = model.prefill(rows, start, T + 1)
    logits, _ = run_step(model.module(), cache, jnp.asarray(tokens.reshape(-1, 1)), jnp.zeros(B * T, jnp.int32),
                         skip=skip)
    full = np.asarray(model.logits(tokens)).argmax(-1)
    return np.asarray(logits[:, 0]).argmax(-1).reshape(B, T) == full


@pytest.fixture(scope="module")
def searched(tiny_models):
    model, _ = tiny_models["llama-deep"]
    tokens = np.random.default_rng(3).integers(2, model.cfg.vocab_size, (2, 10)).astype(np.int32)
    return model, tokens, search(model, tokens, 1.0, candidates=0, progress=False)


def test_search_reports_the_one_draft_acceptance(searched):
    """Every point's agreement is the share of positions where the decode loop's one-token draft
    (run_step with the set skipped, through the full model's cache) equals the full model's argmax;
    accepted_1 is that share; the set grows by one sublayer per step up to everything."""
    model, tokens, curve = searched
    L = model.cfg.n_layers
    assert curve[0].skip == Sublayers() and curve[0].agreement == 1.0 and curve[0].accepted == tuple(range(1, MAX_K + 1))
    assert len(curve) == 2 * L + 1 and sublayer_mask(curve[-1].skip, L).all()
    assert all(np.diff([p.skipped for p in curve]).round(12) > 0)
    for before, after in zip(curve, curve[1:]):
        assert (sublayer_mask(after.skip, L) & ~sublayer_mask(before.skip, L)).sum() == 1
    agreements = [p.agreement for p in curve]
    assert min(agreements) < 0.5  # the tiny random model disagrees without its layers: the test can fail
    for p in curve:
        agree = one_draft_agreement(model, tokens, p.skip)
        assert p.agreement == agree.mean(), format_sublayers(p.skip)
        assert p.accepted[0] == p.agreement and p.accepted[1] == accepted_runs(agree, 2)


def test_search_is_deterministic(searched):
    model, tokens, curve = searched
    again = search(model, tokens, 0.5, candidates=2, progress=False)
    full = search(model, tokens, 0.5, candidates=0, progress=False)
    assert again[:2] == curve[:2]  # the first step tries every sublayer either way
    assert full == curve[:len(full)]
    assert again == search(model, tokens, 0.5, candidates=2, progress=False)


def test_accepted_runs():
    agree = np.asarray([[1, 1, 0, 1, 1, 1]], bool)
    assert accepted_runs(agree, 1) == pytest.approx(5 / 6)
    assert accepted_runs(agree, 2) == pytest.approx((2 + 1 + 0 + 2 + 2) / 5)
    assert accepted_runs(agree, 3) == pytest.approx((2 + 1 + 0 + 3) / 4)


def test_sublayer_sets_and_text():
    skip = Sublayers(frozenset({3, 5, 6, 7}), frozenset({4}))
    mask = sublayer_mask(skip, 8)
    assert np.flatnonzero(mask).tolist() == [4, 7, 8, 10, 12] and sublayer_set(mask) == skip
    assert format_sublayers(skip) == "attn:3,5-7;mlp:4" and parse_sublayers("attn:3,5-7;mlp:4") == skip
    assert parse_sublayers(" mlp: 2 ") == Sublayers(frozenset(), frozenset({2}))
    for bad in ("", "attn:", "mlp:0", "attn:3-1", "attn:1;attn:2", "layer:1", "mlp:1-x"):
        with pytest.raises(ValueError):
            parse_sublayers(bad)


def test_store_round_trip_and_errors(searched, tmp_path):
    model, _, curve = searched
    L = model.cfg.n_layers
    chosen = curve[3]
    record = store_json(curve, chosen, L, {"text": "test"})
    (tmp_path / FILE).write_text(json.dumps(record))
    assert load_skip(tmp_path, L) == chosen.skip
    with pytest.raises(StoreError, match="made for 6 layers, the model has 7"):
        load_skip(tmp_path, L + 1)
    damaged = {"not json": "{", "not a store": '{"skip": "mlp:1"}',
               "bad set": json.dumps({**record, "skip": "mlp:9-"}), "outside": json.dumps({**record, "skip": "mlp:7"}),
               "no set": json.dumps({**record, "skip": None})}
    for name, text in damaged.items():
        (tmp_path / FILE).write_text(text)
        with pytest.raises(StoreError, match=f"cannot be used .*make it again with `{COMMAND} --model m`") as e:
            load_skip(tmp_path, L, "m")
        assert "\n" not in str(e.value), name
    (tmp_path / FILE).unlink()
    with pytest.raises(StoreError, match=f"is missing\\); make one with `{COMMAND}`.*--skip-sublayers"):
        load_skip(tmp_path, L)


def tokenizer():
    return types.SimpleNamespace(eos_ids=(), pad_id=0, decode=lambda ids: "")


@pytest.mark.parametrize("name", ["gpt2", "llama-deep"])
def test_greedy_output_with_a_searched_set_is_plain_greedy(name, tiny_models, rng):
    """A batch whose rows accept different counts, with a set the search chose (and K = 3)."""
    model, _ = tiny_models[name]
    tokens = rng.integers(2, model.cfg.vocab_size, (2, 8)).astype(np.int32)
    skip = search(model, tokens, 0.3, progress=False)[-1].skip
    spec = Speculation("layers", 3, skip=skip, break_even=0.0)
    plain, fast = Generator(model, tokenizer()), Generator(model, tokenizer(), speculation=spec)
    ids = [rng.integers(2, model.cfg.vocab_size, n).tolist() for n in (11, 5, 8)]
    want, got = plain(ids, max_new_tokens=20), fast(ids, max_new_tokens=20)
    assert got.token_ids == want.token_ids
    assert got.speculation["verify_steps"] > 0 and got.speculation["accepted"] > 0
    assert got.speculation["skip"] == {"attention": sorted(skip.attention), "mlp": sorted(skip.mlp)}


def test_cli_search_then_self_speculation(tmp_path, capsys):
    """`python -m qsjax.speculative.search` stores a set beside a tiny model; `generate
    --self-speculation` drafts with it (the report says so) and prints plain greedy's text."""
    from qsjax import generate
    from qsjax.speculative import search as search_command

    (tmp_path / "m").mkdir()
    model_dir = save_tiny_llama_with_tokenizer(tmp_path / "m", ["The quick brown fox jumps over the lazy dog."] * 3,
                                               n_layers=3, n_positions=128)
    assert search_command.main(["--model", str(model_dir), "--tokens", "24", "--skipped", "0.3", "--quiet"]) == 0
    stored = json.loads((model_dir / FILE).read_text())
    assert stored["skipped"] >= 0.3 and stored["curve"][0]["agreement"] == 1.0
    assert stored["searched_on"]["tokens"] == 24
    prompt = ["--model", str(model_dir), "The quick brown", "--max-new-tokens", "12"]
    assert generate.main(prompt) == 0
    plain = capsys.readouterr().out
    assert generate.main([*prompt, "--self-speculation", "--num-assistant-tokens", "2", "--json", str(tmp_path / "r.json")]) == 0
    assert capsys.readouterr().out == plain
    spec = json.loads((tmp_path / "r.json").read_text())["speculation"]
    assert spec["method"] == "layers" and spec["num_tokens"] == 2
    assert format_sublayers(Sublayers(frozenset(spec["skip"]["attention"]), frozenset(spec["skip"]["mlp"]))) == stored["skip"]


@pytest.mark.parametrize("args, message", [
    (["--tokens", "3"], "--tokens must be at least 2 per row (4)"),
    (["--rows", "0"], "--rows must be >= 1"),
    (["--skipped", "0.6"], "--skipped must be in (0, --max-skipped = 0.5]"),
    (["--max-skipped", "1.5"], "--max-skipped must be in (0, 1]"),
    (["--candidates", "-1"], "--candidates must be >= 0"),
    (["--output", "/nonexistent-dir/self-draft.json"], "--output"),
])
def test_search_command_errors(args, message, tmp_path):
    """Bad options are refused before the model loads (a missing model directory is never reached)."""
    from qsjax.runtime.cli import UsageError
    from qsjax.speculative import search as search_command

    with pytest.raises(UsageError) as e:
        search_command.main(["--model", str(tmp_path / "none"), *args])
    assert message in str(e.value)
