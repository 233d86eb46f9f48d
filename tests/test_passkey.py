"""`python -m qsjax.passkey`: prompt construction (pure functions, then with a real tokenizer), the
answer rule, argument errors, and end to end on a tiny random GPT-2 (accuracy ~0; structure and
determinism are what is checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_gpt2_with_tokenizer

from qsjax.evaluation import passkey_task as pk

ROOT = Path(__file__).resolve().parent.parent


def run_passkey(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QSJAX_COMPILATION_CACHE": "off"}
    return subprocess.run([sys.executable, "-m", "qsjax.passkey", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, check=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random GPT-2 with 256 positions and a byte-level BPE tokenizer trained on the prompt's texts."""
    texts = [pk.FILLER, pk.INSTRUCTION, pk.NEEDLE.format(key=12345) + " 0123456789", f"{pk.QUESTION} {pk.ANSWER}"]
    return save_tiny_gpt2_with_tokenizer(tmp_path_factory.mktemp("tiny-passkey"), texts, n_positions=256)


def chars(texts):
    """A character-level encode_batch: one token per character."""
    return [[ord(c) for c in t] for t in texts]


def test_answer_rule():
    assert pk.is_correct(" 71432. Remember it.", 71432)
    assert pk.is_correct("is 71432", 71432) and pk.is_correct("71432", 71432)
    for wrong in (" 714320", " 7143", " 7 1 4 3 2", " 12345 71432", "", " the key"):
        assert not pk.is_correct(wrong, 71432), wrong
    assert pk.first_number("key: 0042x") == "0042" and pk.first_number("none") is None


def test_depths():
    assert pk.depth_fractions(1) == [0.5]
    assert pk.depth_fractions(2) == [0.0, 1.0]
    assert pk.depth_fractions(5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_sentences_and_haystack():
    text = "One two. Three?\nFour\n\nFive! Six"
    sentences = pk.split_sentences(text)
    assert "".join(sentences) == text
    assert sentences == ["One two.", " Three?", "\nFour", "\n\nFive!", " Six"]
    ids, bounds = pk.haystack_tokens(chars, sentences, 50)  # longer than the text: it repeats
    assert len(ids) == 50 and "".join(map(chr, ids)).startswith(text + "One two.")
    assert bounds[0] == 0 and bounds[-1] == 50 and bounds == sorted(set(bounds))
    for b in bounds[1:-1]:  # inner boundaries: after a sentence (or the text, repeated)
        assert chr(ids[b - 1]) in ".?!rx" and chr(ids[b]) in " \nO"


def test_build_prompt_depth():
    hay = list(range(100, 200))
    bounds = [0, 10, 30, 55, 70, 100]
    for depth, b in [(0.0, 0), (0.25, 30), (0.5, 55), (0.6, 55), (0.62, 55), (0.63, 70), (1.0, 100)]:
        ids, at = pk.build_prompt([1, 2], hay, bounds, depth, [7, 7, 7], [9])
        assert at == b, depth
        assert ids == [1, 2, *hay[:b], 7, 7, 7, *hay[b:], 9]
    assert pk.build_prompt([], hay, [0, 40, 60, 100], 0.5, [7], [])[1] == 40  # a tie goes to the earlier boundary


def test_cells_real_tokenizer(tiny, tmp_path):
    from qsjax.checkpoints.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny)
    args = dict(lengths=[180, 256], depths=pk.depth_fractions(3), trials=3, seed=7, max_new=10, chat=False)
    cells = pk.make_cells(tok, pk.FILLER + " ", **args)
    head, tail = pk.prompt_frame(tok, False)
    assert len(cells) == 6
    for cell in cells:
        for key, ids, at, n in zip(cell["keys"], cell["prompts"], cell["needle_at"], cell["haystack_tokens"]):
            assert len(ids) == cell["length"] - 10  # exact: the answer fits the length
            needle = tok.encode(pk.NEEDLE.format(key=key), add_special_tokens=False)
            start = len(head) + at
            assert ids[start:start + len(needle)] == needle and ids[-len(tail):] == tail
            assert abs(at / n - cell["depth"]) < 0.15  # the filler's sentences are ~5 tokens apart
            assert f"The pass key is {key}." in tok.decode(ids)
    keys = [k for c in cells for k in c["keys"]]
    assert len(set(keys)) == len(keys) and all(10_000 <= k < 100_000 for k in keys)
    assert pk.make_cells(tok, pk.FILLER + " ", **args) == cells  # deterministic for a seed
    assert [c["keys"] for c in pk.make_cells(tok, pk.FILLER + " ", **{**args, "seed": 8})] != [c["keys"] for c in cells]
    with pytest.raises(pk.UsageError, match="too short"):
        pk.make_cells(tok, pk.FILLER, **{**args, "lengths": [100]})


def test_cells_real_text(tiny, tmp_path):
    """--haystack: the text around the needle is the file's, from its start."""
    from qsjax.evaluation.data import read_text
    from qsjax.checkpoints.tokenizer import load_tokenizer

    docs = ["Alpha beta gamma. Delta epsilon.", "Zeta eta theta! Iota kappa lambda mu nu xi omicron."]
    (tmp_path / "hay.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    tok = load_tokenizer(tiny)
    cells = pk.make_cells(tok, read_text(tmp_path / "hay.jsonl") + "\n\n", [220], [1.0], 1, 0, 10, False)
    head = pk.prompt_frame(tok, False)[0]
    text = tok.decode(cells[0]["prompts"][0][len(head):])
    assert text.startswith("Alpha beta gamma. Delta epsilon.\n\nZeta eta theta!")
    assert "lambda" in text.split("The pass key")[0]  # depth 100%: the needle after the haystack


def test_argument_errors(tiny, tmp_path):
    """Exit 2, one `error:` line, nothing written; the context check runs before the weights load
    (the model directory `noweights` has none)."""
    (tmp_path / "noweights").mkdir()
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / "noweights" / name).write_text((tiny / name).read_text())
    cases = {
        "depths 0": (["--depths", 0], "--depths must be >= 1"),
        "trials 0": (["--trials", 0], "--trials must be >= 1"),
        "lengths not numbers": (["--lengths", "1k,2k"], "comma-separated"),
        "lengths 0": (["--lengths", "0,256"], "must be positive"),
        "max-new-tokens 0": (["--max-new-tokens", 0], "--max-new-tokens"),
        "compare without a setting": (["--compare"], "--compare"),
        "bad quicksilver value": (["--keep-top-k", 2], "--keep-top-k"),
        "longer than the context": (["--lengths", "256,512", "--model", tmp_path / "noweights"], "context (256"),
        "too short": (["--lengths", 100, "--model", tmp_path / "noweights"], "too short"),
        "missing haystack": (["--haystack", tmp_path / "missing.txt"], "not found"),
        "json is a directory": (["--json", tmp_path], "is a directory"),
        "plot to stdout": (["--plot", "-"], "--plot"),
        "budget with quicksilver": (["--kv-budget", 64, "--halt-cutoff-layer", 1], "does not combine"),
        "recent without a budget": (["--kv-recent", 8], "needs --kv-budget"),
    }
    out = tmp_path / "out"
    out.mkdir()
    for name, (args, message) in cases.items():
        if "--model" not in args:
            args = [*args, "--model", tiny]
        if "--json" not in args:
            args = [*args, "--json", out / "r.json"]
        proc = run_passkey("--lengths", 200, *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert list(out.iterdir()) == [], name


def test_end_to_end_compare(tiny, tmp_path):
    """--compare with --json and --plot; two runs give the same answers."""
    args = ["--model", tiny, "--lengths", "180,256", "--depths", 2, "--trials", 2, "--compare", "--halt-cutoff-layer",
            1, "--no-progress", "--plot", tmp_path / "nih.png"]
    reports = []
    for i in range(2):
        proc = run_passkey(*args, "--json", tmp_path / f"r{i}.json")
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads((tmp_path / f"r{i}.json").read_text()))
    report = reports[0]
    assert {"accuracy", "cells", "settings", "dense", "seconds", "seconds_compile"} <= set(report)
    s = report["settings"]
    assert s["lengths"] == [180, 256] and s["depths"] == [0.0, 1.0] and s["trials"] == 2
    assert s["quicksilver"]["halt_cutoff_layer"] == 1 and s["haystack"] == "filler"
    for run in (report, report["dense"]):
        assert [(c["length"], c["depth"]) for c in run["cells"]] == [(180, 0.0), (180, 1.0), (256, 0.0), (256, 1.0)]
        trials = [t for c in run["cells"] for t in c["trials"]]
        assert len(trials) == 8 and all(t["correct"] == pk.is_correct(t["answer"], t["key"]) for t in trials)
        assert [t["prompt_tokens"] for t in trials] == [170] * 4 + [246] * 4
        assert run["accuracy"] == sum(t["correct"] for t in trials) / 8
    assert [t["key"] for c in report["cells"] for t in c["trials"]] == \
        [t["key"] for c in report["dense"]["cells"] for t in c["trials"]]  # the same prompts

    def answers(r):
        return [[t["answer"] for c in run["cells"] for t in c["trials"]] for run in (r, r["dense"])]

    assert answers(reports[0]) == answers(reports[1])
    assert "dense" in proc.stdout and "quicksilver" in proc.stdout and "180" in proc.stdout
    assert (tmp_path / "nih.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dense_json_on_stdout_with_haystack(tiny, tmp_path):
    (tmp_path / "hay.txt").write_text("Alpha beta gamma. Delta epsilon zeta.\n" * 3, encoding="utf-8")
    proc = run_passkey("--model", tiny, "--lengths", 200, "--depths", 1, "--trials", 1, "--haystack",
                       tmp_path / "hay.txt", "--json", "-", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "dense" not in report and report["settings"]["quicksilver"] is None
    assert report["settings"]["haystack_path"] == str(tmp_path / "hay.txt") and report["cells"][0]["depth"] == 0.5
    assert "accuracy" in proc.stderr  # the table moves to stderr


def test_end_to_end_with_a_kv_budget(tiny, tmp_path):
    """--compare beside H2O eviction to a budget below the prompt: the report names the rule."""
    proc = run_passkey("--model", tiny, "--lengths", 200, "--depths", 1, "--trials", 2, "--compare", "--kv-budget", 64,
                       "--kv-evict", "h2o", "--kv-recent", 16, "--no-progress", "--json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["eviction"] == dict(policy="h2o", budget=64, n_sink=4, recent=16)
    assert report["settings"]["label"] == "h2o kv-budget 64" and "dense" in report
    assert [t["prompt_tokens"] for t in report["cells"][0]["trials"]] == [190, 190]
