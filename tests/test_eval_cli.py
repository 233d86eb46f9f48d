"""`python -m qsjax.eval` end to end on a tiny random GPT-2 with a tiny byte-level BPE tokenizer,
and its error paths: exit status 2, one `error:` line, no traceback, no JSON file left behind."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_gpt2_with_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model reads a small text, one token at a time.",
    "Perplexity is the exponential of the mean negative log-likelihood.",
    "Windows overlap, and only the tokens no earlier window scored are counted.",
]
TEXT = "\n\n".join(SENTENCES * 3)


def run_eval(*args, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QSJAX_COMPILATION_CACHE": "off", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "qsjax.eval", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A random GPT-2 (vocab 320, 64 positions) saved by transformers, with a BPE tokenizer.json."""
    path = save_tiny_gpt2_with_tokenizer(tmp_path_factory.mktemp("tiny-gpt2"), SENTENCES, vocab_size=320)
    (path / "data.txt").write_text(TEXT, encoding="utf-8")
    return path


def direct_strided_nll(model_dir, max_tokens, max_length, stride):
    """Mean NLL by Hugging Face's loop, from the full logits of `Model.logits`."""
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.checkpoints.tokenizer import load_tokenizer

    model = load_model(model_dir)
    ids = np.asarray(load_tokenizer(model_dir).encode(TEXT), np.int32)[:max_tokens]
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        logits = np.asarray(model.logits(ids[None, begin:end]), np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for t in range(max(prev_end, begin + 1), end):  # scored tokens, each from the logits before it
            total -= logp[t - 1 - begin, ids[t]]
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return total / count, count


def test_end_to_end(tiny_gpt2, tmp_path):
    out = tmp_path / "result.json"
    args = ["--model", tiny_gpt2, "--data", tiny_gpt2 / "data.txt", "--max-length", 32, "--stride", 12]
    proc = run_eval(*args, "--max-eval-tokens", 100, "--batch-size", 2, "--json", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    for key in ("model", "data", "protocol", "perplexity", "nll_mean", "tokens_scored", "seconds", "seconds_compile",
                "tokens_per_second", "flops"):  # fmt: skip
        assert key in report
    assert set(report["flops"]) >= {"total", "per_token", "attention", "projections", "mlp", "lm_head"}
    assert report["protocol"] == {"name": "strided", "max_length": 32, "stride": 12}
    assert report["tokens_total"] == 100 and report["tokens_scored"] == 99
    assert report["perplexity"] == pytest.approx(math.exp(report["nll_mean"]), rel=1e-12)
    nll, count = direct_strided_nll(tiny_gpt2, 100, 32, 12)
    assert report["tokens_scored"] == count
    assert report["nll_mean"] == pytest.approx(nll, rel=1e-5)
    assert report["flops"]["total"] == sum(report["flops"][k] for k in ("attention", "projections", "mlp", "lm_head"))
    assert "perplexity" in proc.stdout and "it]" not in proc.stdout  # the table on stdout, the bar on stderr
    assert "window" in proc.stderr


def test_disjoint_json_on_stdout(tiny_gpt2):
    proc = run_eval("--model", tiny_gpt2, "--data", tiny_gpt2 / "data.txt", "--protocol", "disjoint", "--seqlen", 40,
                    "--json", "-", "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    n = report["tokens_total"]
    assert report["protocol"] == {"name": "disjoint", "seqlen": 40}
    assert report["windows"] == n // 40 and report["tokens_scored"] == (n // 40) * 39
    assert "perplexity" in proc.stderr  # the table moves to stderr


def test_tail_protocol_scores_the_last_stride_of_each_window(tiny_gpt2):
    """--protocol tail: windows of --max-length every --stride tokens, each scoring its last --stride
    tokens, every one of them with --max-length - --stride tokens of context; the NLL equals the
    direct computation from full logits of each window."""
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.checkpoints.tokenizer import load_tokenizer

    proc = run_eval("--model", tiny_gpt2, "--data", tiny_gpt2 / "data.txt", "--protocol", "tail", "--max-length", 40,
                    "--stride", 8, "--max-eval-tokens", 100, "--batch-size", 3, "--json", "-", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["protocol"] == {"name": "tail", "max_length": 40, "stride": 8}
    assert report["windows"] == 8 and report["tokens_scored"] == 64  # windows ending at 40, 48, ..., 96
    model = load_model(tiny_gpt2)
    ids = np.asarray(load_tokenizer(tiny_gpt2).encode(TEXT), np.int32)[:100]
    total = 0.0
    for end in range(40, 101, 8):
        logits = np.asarray(model.logits(ids[None, end - 40:end]), np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= sum(logp[t - 1 - (end - 40), ids[t]] for t in range(end - 8, end))
    assert report["nll_mean"] == pytest.approx(total / 64, rel=1e-5)


def error_cases(model: Path, tmp: Path):
    (tmp / "empty.txt").write_text("\n \n", encoding="utf-8")
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp / "notext.jsonl").write_text('{"text": "a"}\n{"url": "b"}\n', encoding="utf-8")
    (tmp / "nomodel").mkdir()
    (tmp / "noweights").mkdir()
    for name in ("config.json", "tokenizer.json"):
        (tmp / "noweights" / name).write_text((model / name).read_text())
    data = model / "data.txt"
    return {
        "missing data": (["--data", tmp / "missing.txt"], "not found"),
        "empty text": (["--data", tmp / "empty.txt"], "no text"),
        "not utf-8": (["--data", tmp / "latin1.txt"], "not UTF-8"),
        "jsonl without text": (["--data", tmp / "notext.jsonl"], 'line 2: expected an object with a string field "text"'),
        "stride > max-length": (["--data", data, "--max-length", 16, "--stride", 17], "--stride"),
        "stride 0": (["--data", data, "--max-length", 16, "--stride", 0], "--stride"),
        "max-length > context": (["--data", data, "--max-length", 128, "--stride", 64], "longer than the model's context"),
        "seqlen > stream": (["--data", data, "--protocol", "disjoint", "--seqlen", 60, "--max-eval-tokens", 50], "longer than the token stream"),
        "tail without context": (["--data", data, "--protocol", "tail", "--max-length", 16, "--stride", 16], "needs --stride below"),
        "tail > stream": (["--data", data, "--protocol", "tail", "--max-length", 60, "--stride", 8, "--max-eval-tokens", 50], "longer than the token stream"),
        "not a number": (["--data", data, "--stride", "half"], "invalid int value"),
        "max-eval-tokens 1": (["--data", data, "--max-eval-tokens", 1], "--max-eval-tokens"),
        "model dir missing": (["--data", data, "--model", tmp / "nowhere"], "no such directory"),
        "model dir without config": (["--data", data, "--model", tmp / "nomodel"], "no config.json"),
        "model dir without weights": (["--data", data, "--model", tmp / "noweights", "--max-length", 16, "--stride", 8],
                                      "model.safetensors"),
    }  # fmt: skip


def test_error_paths(tiny_gpt2, tmp_path):
    for name, (args, message) in error_cases(tiny_gpt2, tmp_path).items():
        if "--model" not in args:
            args = [*args, "--model", tiny_gpt2]
        out = tmp_path / "out" / f"{name}.json"
        out.parent.mkdir(exist_ok=True)
        proc = run_eval(*args, "--json", out)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert list(out.parent.iterdir()) == [], name  # no JSON, no temporary file


def test_named_data_set_under_qsjax_data(tiny_gpt2, tmp_path):
    import gzip

    (tmp_path / "c4").mkdir()
    with gzip.open(tmp_path / "c4" / "c4_validation_sample.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": s, "url": "u"}) + "\n" for s in SENTENCES)
    proc = run_eval("--model", tiny_gpt2, "--data", "c4", "--max-length", 16, "--stride", 8, "--json", "-", "--no-progress",
                    env={"QSJAX_DATA": str(tmp_path)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["data"] == "c4" and report["data_path"] == str(tmp_path / "c4" / "c4_validation_sample.jsonl.gz")


def test_json_path_is_a_directory(tiny_gpt2, tmp_path):
    proc = run_eval("--model", tiny_gpt2, "--data", tiny_gpt2 / "data.txt", "--json", tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "is a directory" in proc.stderr


def test_quicksilver_report(tiny_gpt2, tmp_path):
    """QuickSilver options add a `quicksilver` block; all off gives the dense perplexity; the
    compacted and masked paths agree; a bad option is one error line."""
    base = ["--model", tiny_gpt2, "--data", tiny_gpt2 / "data.txt", "--max-length", 32, "--stride", 8,
            "--max-eval-tokens", 100, "--no-progress", "--json", "-"]  # fmt: skip
    dense = json.loads(run_eval(*base).stdout)
    assert "quicksilver" not in dense
    runs = {}
    for name, extra in {"compact": [], "masked": ["--masked-reference"]}.items():
        proc = run_eval(*base, "--halt-cutoff-layer", 1, "--kv-skip", "mask", *extra)
        assert proc.returncode == 0, proc.stderr
        runs[name] = json.loads(proc.stdout)
    q, setting = runs["compact"]["quicksilver"], runs["compact"]["settings"]["quicksilver"]
    assert setting["halt"] == "cutoff" and setting["halt_cutoff_layer"] == 1 and setting["compact"]
    assert runs["masked"]["settings"]["quicksilver"]["compact"] is False
    assert 0 < q["executed_flops_reduction"] < 1 and q["fraction_token_layers_executed"] < 1
    assert q["kv_writes_skipped"] > 0 and q["tokens_halted"] > 0
    assert runs["compact"]["perplexity"] == pytest.approx(runs["masked"]["perplexity"], rel=1e-5)
    assert runs["compact"]["perplexity"] != pytest.approx(dense["perplexity"], rel=1e-6)
    assert runs["compact"]["tokens_scored"] == dense["tokens_scored"]
    bad = run_eval(*base, "--halt-cutoff-layer", 9)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
