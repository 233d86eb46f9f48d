"""`python -m qsjax.generate` in subprocesses, on a tiny random GPT-2 (32 positions) with a tiny
byte-level BPE tokenizer: error paths (exit status 2, one `error:` line, no traceback), streaming,
prompt batches, sampling seeds, the persistent compilation cache, and one run of the real default model."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_gpt2_with_tokenizer

from qsjax.kvpolicy.eviction import Eviction
from qsjax.runtime.generator import Generator
from qsjax.checkpoints.hf_params import load_model
from qsjax.checkpoints.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model reads a small text, one token at a time.",
    "Every prompt in a batch is padded on the left.",
]
SUMMARY = re.compile(r"prompt tokens (\d+), new tokens (\d+), compile ([\d.]+) s \((\d+) compiled programs\), "
                     r"first token ([\d.]+) s, decode ([\d.]+|n/a) tokens/s")


def run_generate(*args, cache=None, timeout=300):
    """Run the CLI; returns (exit status, stdout, stderr) with stdout decoded without newline translation."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
    env["QSJAX_COMPILATION_CACHE"] = str(cache) if cache else "off"
    command = [sys.executable, "-m", "qsjax.generate", *map(str, args)]
    proc = subprocess.run(command, capture_output=True, env=env, cwd=ROOT, timeout=timeout, check=False)
    return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")


def summary(stderr: str) -> tuple[int, int, float]:
    """(prompt tokens, new tokens, compile seconds) from stderr's last line, which also counts the
    compiled programs (a prefill and a decode loop per run here)."""
    m = SUMMARY.fullmatch(stderr.strip().splitlines()[-1])
    assert m, stderr
    assert int(m[4]) == 2, stderr
    return int(m[1]), int(m[2]), float(m[3])


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A random GPT-2 with 32 positions, saved by transformers, with a BPE tokenizer.json of the same vocabulary."""
    return save_tiny_gpt2_with_tokenizer(tmp_path_factory.mktemp("tiny-gpt2-32"), SENTENCES, n_positions=32, init_std=0.3)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compilation-cache")


# ---------------------------------------------------------------------------------------------
# Errors


ERROR_NAMES = [
    "model dir missing", "model dir without config", "model dir without weights", "prompt longer than context",
    "prompt + new tokens > context", "temperature -1", "top-p 0", "top-p 1.5", "top-k -1", "max-new-tokens 0",
    "empty prompt", "prompts file not UTF-8", "prompts file missing", "no prompt", "prompt and prompts file",
    "unknown flag", "bad type", "bad choice", "lookup 0 tokens", "two drafters", "ngram without lookup",
    "early exit past the model", "speculation under scope all",
    "self-speculation without a stored set", "self-speculation with a damaged store", "skip-sublayers syntax",
    "skip-sublayers past the model", "self-speculation and lookup", "assistant tokens alone",
]  # fmt: skip


def error_cases(model: Path, tmp: Path) -> dict:
    """name -> (arguments, a piece of the expected message)."""
    (tmp / "nomodel").mkdir()
    (tmp / "noweights").mkdir()
    for name in ("config.json", "tokenizer.json"):
        (tmp / "noweights" / name).write_bytes((model / name).read_bytes())
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    m = ["--model", model]
    return {
        "model dir missing": (["--model", tmp / "nowhere", "Hi"], "no such directory"),
        "model dir without config": (["--model", tmp / "nomodel", "Hi"], "no config.json"),
        "model dir without weights": (["--model", tmp / "noweights", "Hi"], "model.safetensors"),
        "prompt longer than context": ([*m, " ".join(SENTENCES * 3), "--max-new-tokens", 4], "model's context of 32"),
        "prompt + new tokens > context": ([*m, "The quick", "--max-new-tokens", 40], "model's context of 32"),
        "temperature -1": ([*m, "Hi", "--temperature", -1], "--temperature"),
        "top-p 0": ([*m, "Hi", "--top-p", 0], "--top-p"),
        "top-p 1.5": ([*m, "Hi", "--top-p", 1.5], "--top-p"),
        "top-k -1": ([*m, "Hi", "--top-k", -1], "--top-k"),
        "max-new-tokens 0": ([*m, "Hi", "--max-new-tokens", 0], "--max-new-tokens"),
        "empty prompt": ([*m, ""], "empty prompt"),
        "prompts file not UTF-8": ([*m, "--prompts-file", tmp / "latin1.txt"], "not UTF-8"),
        "prompts file missing": ([*m, "--prompts-file", tmp / "missing.txt"], "no such file"),
        "no prompt": (m, "give a prompt or --prompts-file"),
        "prompt and prompts file": ([*m, "Hi", "--prompts-file", tmp / "latin1.txt"], "exactly one"),
        "unknown flag": ([*m, "Hi", "--bogus"], "unrecognized arguments: --bogus"),
        "bad type": ([*m, "Hi", "--top-k", "many"], "invalid int value"),
        "bad choice": ([*m, "Hi", "--dtype", "int8"], "invalid choice"),
        "lookup 0 tokens": ([*m, "Hi", "--prompt-lookup-num-tokens", 0], "--prompt-lookup-num-tokens must be >= 1"),
        "two drafters": ([*m, "Hi", "--prompt-lookup-num-tokens", 4, "--assistant-early-exit", 1], "one drafter"),
        "ngram without lookup": ([*m, "Hi", "--max-matching-ngram-size", 3], "goes with --prompt-lookup-num-tokens"),
        "early exit past the model": ([*m, "Hi", "--assistant-early-exit", 2], "below the model's 2 layers"),
        "speculation under scope all": ([*m, "Hi", "--prompt-lookup-num-tokens", 4, "--quicksilver", "paper",
                                                                  "--scope", "all"], "scope context"),
        "self-speculation without a stored set": ([*m, "Hi", "--self-speculation"], "python -m qsjax.speculative.search"),
        "self-speculation with a damaged store": (["--model", damaged_store(model, tmp), "Hi", "--self-speculation"],
                                                  "cannot be used (not a qsjax self-draft 1 file)"),
        "skip-sublayers syntax": ([*m, "Hi", "--skip-sublayers", "attn:2-1"], "a range goes up"),
        "skip-sublayers past the model": ([*m, "Hi", "--skip-sublayers", "mlp:1,3"], "layers 1..2, got [1, 3]"),
        "self-speculation and lookup": ([*m, "Hi", "--self-speculation", "--prompt-lookup-num-tokens", 3], "one drafter"),
        "assistant tokens alone": ([*m, "Hi", "--num-assistant-tokens", 3], "goes with --assistant-early-exit"),
    }  # fmt: skip


def damaged_store(model: Path, tmp: Path) -> Path:
    """A copy of the model directory whose stored self-drafting set is not one."""
    (tmp / "damaged").mkdir()
    for f in model.iterdir():
        (tmp / "damaged" / f.name).symlink_to(f)
    (tmp / "damaged" / "self-draft.json").write_text('{"skip": "mlp:1"}')
    return tmp / "damaged"


@pytest.fixture(scope="module")
def error_runs(tiny_gpt2, tmp_path_factory):
    """name -> (status, stdout, stderr, expected message piece) for every error case, run two at a time."""
    tmp = tmp_path_factory.mktemp("errors")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8", "QSJAX_COMPILATION_CACHE": "off"}
    cases = list(error_cases(tiny_gpt2, tmp).items())
    assert [name for name, _ in cases] == ERROR_NAMES
    runs = {}
    for i in range(0, len(cases), 2):  # each run is mostly importing jax: use both cores
        procs = {}
        for name, (args, message) in cases[i : i + 2]:
            command = [sys.executable, "-m", "qsjax.generate", *map(str, args)]
            proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs[name] = (message, proc)
        for name, (message, proc) in procs.items():
            out, err = proc.communicate(timeout=300)
            runs[name] = (proc.returncode, out.decode("utf-8"), err.decode("utf-8"), message)
    return runs


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_error(error_runs, name):
    status, out, err, message = error_runs[name]
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and out == ""


# ---------------------------------------------------------------------------------------------
# Generation


def test_single_prompt_streams_and_matches_generator(tiny_gpt2, cache_dir):
    status, out, err = run_generate("--model", tiny_gpt2, "The quick brown", "--max-new-tokens", 12, cache=cache_dir)
    assert status == 0, err
    prompt_tokens, new_tokens, _ = summary(err)
    gen = Generator(load_model(tiny_gpt2), load_tokenizer(tiny_gpt2))
    ids = gen.encode("The quick brown")
    result = gen([ids], max_new_tokens=12)
    assert prompt_tokens == len(ids) and new_tokens == len(result.token_ids[0]) > 0
    assert out == result.texts[0] + "\n" and result.texts[0].strip()


def test_prompts_file_batch_and_persistent_compilation_cache(tiny_gpt2, tmp_path):
    """A batch (no streaming) is compiled once and loaded from the persistent cache on the next run.

    (A single prompt streams through `io_callback`; JAX does not write programs with host callbacks
    to the persistent cache, so that path compiles afresh every run.)"""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick\n\nA small model\nEvery prompt\n", encoding="utf-8")  # blank lines are skipped
    cache = tmp_path / "cache"
    first = run_generate("--model", tiny_gpt2, "--prompts-file", prompts, "--max-new-tokens", 10, cache=cache)
    second = run_generate("--model", tiny_gpt2, "--prompts-file", prompts, "--max-new-tokens", 10, cache=cache)
    assert first[0] == 0 and second[0] == 0, (first[2], second[2])
    assert first[1] == second[1] and len(first[1].split("\n----\n")) == 3 and first[1].endswith("\n")
    tokenizer = load_tokenizer(tiny_gpt2)
    n_prompt, n_new, compile_first = summary(first[2])
    assert n_prompt == sum(len(tokenizer.encode(p)) for p in ("The quick", "A small model", "Every prompt"))
    assert 0 < n_new <= 30
    compile_second = summary(second[2])[2]
    print(f"batch compile: {compile_first:.2f} s, then {compile_second:.2f} s from the persistent cache")
    assert compile_second < compile_first


def test_sampling_is_reproducible_per_seed(tiny_gpt2, cache_dir):
    args = ["--model", tiny_gpt2, "A small", "--max-new-tokens", 24, "--do-sample"]
    one = run_generate(*args, "--seed", 1, cache=cache_dir)
    again = run_generate(*args, "--seed", 1, cache=cache_dir)
    two = run_generate(*args, "--seed", 2, cache=cache_dir)
    assert one[0] == again[0] == two[0] == 0, one[2]
    assert one[1] == again[1] and one[1] != two[1]


def test_speculation_with_eviction(tiny_gpt2, cache_dir, tmp_path):
    """Prompt lookup with --kv-budget runs, and gives the text plain decoding with the same eviction
    gives (that drafts verified on an evicting cache keep it so: tests/test_speculative_eviction.py)."""
    prompt = "The quick brown The quick"
    args = ["--model", tiny_gpt2, prompt, "--max-new-tokens", 12, "--kv-budget", 8, "--kv-evict", "h2o", "--n-sink", 2]
    status, out, err = run_generate(*args, "--prompt-lookup-num-tokens", 3, "--json", tmp_path / "report.json",
                                    cache=cache_dir)
    assert status == 0, err
    gen = Generator(load_model(tiny_gpt2), load_tokenizer(tiny_gpt2), eviction=Eviction("h2o", 8, n_sink=2))
    want = gen([gen.encode(prompt)], max_new_tokens=12)
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["prompt_tokens"], report["new_tokens"]) == (want.prompt_tokens[0], len(want.token_ids[0]))
    assert out == want.texts[0] + "\n" and report["speculation"]["method"] == "lookup"


@pytest.mark.slow
def test_real_default_model(default_model_dir, cache_dir):
    status, out, err = run_generate("The capital of France is", "--max-new-tokens", 8, cache=cache_dir)
    assert status == 0, err
    assert "Paris" in out
    assert summary(err)[:2] == (5, 8)


def test_output_after_end_writes_and_counts_nothing(tmp_path, capsys):
    """The interrupt ends the streamed line while the token callback may still deliver a token:
    that token must neither follow the newline nor be counted in the closing line."""
    from qsjax.generate import Output
    from qsjax.checkpoints.tokenizer import StreamDecoder

    save_tiny_gpt2_with_tokenizer(tmp_path, SENTENCES)
    tokenizer = load_tokenizer(tmp_path)
    ids = tokenizer.encode("The quick brown fox")
    out = Output(StreamDecoder(tokenizer))
    for token_id in ids[:2]:
        out.token(token_id)
    out.end()
    out.token(ids[2])
    out.end()
    assert capsys.readouterr().out == tokenizer.decode(ids[:2]) + "\n"
    assert out.new_tokens == 2
