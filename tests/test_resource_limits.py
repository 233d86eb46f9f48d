"""Nothing runs away: runs that cannot fit in memory are batched or refused up front, input too large
for the context is refused from its size, a chat template cannot expand without bound, SIGTERM acts
during tokenization, config.json fields have their types checked, a damaged compilation-cache entry
is removed, and an unreadable $QSJAX_DATA file is an error. Tiny random models, small files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import save_tiny_gpt2_with_tokenizer

from qsjax import generate
from qsjax.checkpoints.tokenizer import load_tokenizer
from qsjax.dense.config import ConfigError
from qsjax.dense.families import load_config
from qsjax.runtime.cli import UsageError

try:  # each test below fails on its own (not the whole file) where these are missing
    from qsjax.checkpoints.tokenizer import TextTooLong
    from qsjax.runtime import memory
except ImportError:
    TextTooLong, memory = AssertionError, None

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "A small model reads a small text, one token at a time."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(save_tiny_gpt2_with_tokenizer(tmp_path_factory.mktemp("tiny-limits"), SENTENCES, n_positions=64))


def run_module(module, *args, env=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QSJAX_COMPILATION_CACHE": "off", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, env=env, cwd=ROOT,
                          **kw)


def one_error_line(proc) -> str:
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 5. Memory: batched when it does not fit at once, refused when one prompt cannot fit


def test_prompts_run_in_batches_that_fit_and_keep_their_order(tiny, tmp_path, monkeypatch, capsys):
    prompts = ["The quick brown", "A small model", "The lazy dog", "one token", "A small text"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    base = ["--model", tiny, "--prompts-file", str(tmp_path / "p.txt"), "--max-new-tokens", "6"]
    monkeypatch.setenv("QSJAX_COMPILATION_CACHE", "off")
    calls = []
    original = generate.Generator.__call__

    def spy(self, batch, **kw):
        calls.append(len(batch))
        return original(self, batch, **kw)

    monkeypatch.setattr(generate.Generator, "__call__", spy)
    assert generate.main(base + ["--batch-size", "5"]) == 0
    together = capsys.readouterr().out
    need = memory.estimate(load_config(tiny), "float32", 16, 6, len(prompts))
    # room for the weights, the prompts and two rows: the default batch is 2
    monkeypatch.setattr(memory, "available_bytes", lambda: int((need.total(2) + need.per_row // 2) / memory.HEADROOM))
    calls.clear()
    assert generate.main(base + ["--json", str(tmp_path / "r.json")]) == 0
    assert calls == [2, 2, 1]
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["batch_size"] == 2  # the batch run, not 5
    assert capsys.readouterr().out == together  # the same texts, in prompt order
    with pytest.raises(UsageError, match="--batch-size 4 needs about .* give --batch-size 2 or less"):
        generate.main(base + ["--batch-size", "4"])


def test_what_cannot_fit_at_batch_one_is_refused_before_the_weights_load(tiny, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 10_000)
    monkeypatch.setattr(generate.Generator, "__init__", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(UsageError, match=r"not enough memory: a prompt of \d+ tokens and 8 new tokens needs about"):
        generate.main(["--model", tiny, "The quick brown", "--max-new-tokens", "8"])


def test_passkey_refuses_trials_that_cannot_fit(tiny, monkeypatch):
    from qsjax import passkey

    monkeypatch.setattr(memory, "available_bytes", lambda: 2 * 10**9)
    monkeypatch.setattr(passkey, "make_cells", lambda *a, **k: pytest.fail("the prompts were built"))
    with pytest.raises(UsageError, match="not enough memory.*lower --trials"):
        passkey.main(["--model", tiny, "--lengths", "60", "--depths", "1", "--trials", "100000000"])


def test_passkey_run_cells_batches_trials_in_order():
    from qsjax.evaluation.passkey_task import run_cells
    from qsjax.runtime.generation_report import GenerationResult

    seen = []

    def gen(prompts, max_new_tokens):
        seen.append(len(prompts))
        return GenerationResult([f" {p[0]}" for p in prompts], [[1]] * len(prompts), [len(p) for p in prompts],
                                0.5, 0.5, 0.1, {})

    keys = [11111, 22222, 33333, 44444, 55555]
    cell = dict(length=9, depth=0.5, keys=keys, prompts=[[k] for k in keys], needle_at=[1] * 5, haystack_tokens=[2] * 5)
    run = run_cells(gen, [cell], 1, False, "x", batch_size=2)
    assert seen == [2, 2, 1] and run["accuracy"] == 1.0 and run["seconds"] == 3.0


# ---------------------------------------------------------------------------------------------
# 6. Oversized input refused from its size; bounded templates; SIGTERM during tokenization


def test_prompt_too_large_for_the_context_is_refused_from_its_size(tiny, monkeypatch):
    tokenizer = load_tokenizer(tiny)
    limit = 64 * tokenizer.max_token_bytes
    tokenizer.check_fits("a" * limit, 64)
    with pytest.raises(TextTooLong):
        tokenizer.check_fits("a" * (limit + 1), 64)
    monkeypatch.setattr(type(tokenizer), "encode", lambda *a, **k: pytest.fail("tokenized"))
    with pytest.raises(UsageError, match="cannot fit the model's context of 64 tokens"):
        generate.main(["--model", tiny, "a" * (limit + 1), "--max-new-tokens", "4"])


def test_the_bound_is_sound_n_bytes_need_at_least_n_over_max_token_bytes_tokens(tiny):
    tokenizer = load_tokenizer(tiny)
    for text in SENTENCES + ["zzzz qqqq \u00e9\u00e9 \U0001f600", "x" * 500]:
        assert len(tokenizer.encode(text, add_special_tokens=False)) * tokenizer.max_token_bytes >= len(text.encode())


def test_chat_template_that_expands_is_refused():
    from qsjax.checkpoints.tokenizer import render_chat_template

    with pytest.raises(TextTooLong):
        render_chat_template("{{ 'a ' * 50000000 }}", [], limit=1000)
    with pytest.raises(TextTooLong):
        render_chat_template("{% for i in range(5000) %}abc{% endfor %}", [], limit=1000)
    assert render_chat_template("{{ 'ab' * 3 }}", []) == "ababab"


def test_sigterm_stops_a_long_tokenization_within_moments(tiny, tmp_path):
    big = tmp_path / "big.txt"
    big.write_bytes(b"The quick brown fox jumps over the lazy dog. " * 600_000)  # one 27 MB line
    code = ("import sys; from qsjax.runtime.cli import run_cli; from qsjax.checkpoints.tokenizer import load_tokenizer\n"
            f"tok = load_tokenizer({str(tiny)!r}); text = open({str(big)!r}).read()\n"
            "def main(argv): print('start', flush=True); tok.encode(text); print('done')\n"
            "run_cli(main)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline() == b"start\n"
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 2.0, err
    assert proc.returncode == 143 and b"done" not in out and err.strip() == b"interrupted", err


# ---------------------------------------------------------------------------------------------
# 7. One error line, not a traceback


@pytest.mark.parametrize("field, value, message", [
    ("layer_norm_epsilon", "abc", "layer_norm_epsilon='abc' must be a positive number"),
    ("tie_word_embeddings", "yes", None),  # gpt2 requires true: already refused
    ("eos_token_id", [0, "x"], "eos_token_id=[0, 'x'] must be a token id"),
])
def test_config_field_of_the_wrong_type_is_named(tiny, tmp_path, field, value, message):
    hf = json.loads((Path(tiny) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, field: value}))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert message is None or message in str(e.value)


def test_llama_rms_norm_eps_string_and_deep_nesting_are_one_error_line(tiny, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    for f in Path(tiny).iterdir():
        (model / f.name).symlink_to(f)
    hf = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 64, "rms_norm_eps": "abc"}
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps(hf))
    assert "rms_norm_eps='abc' must be a positive number" in one_error_line(
        run_module("qsjax.generate", "--model", model, "hi", timeout=300))
    (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in one_error_line(run_module("qsjax.generate", "--model", model, "hi", timeout=300))


def test_prompt_argument_that_is_not_utf8_is_one_error_line(tiny):
    line = one_error_line(run_module("qsjax.generate", "--model", tiny, os.fsdecode(b"a\xff"), timeout=300))
    assert "not UTF-8" in line


# ---------------------------------------------------------------------------------------------
# 8. A damaged compilation-cache entry is removed, with one warning line


def test_damaged_compilation_cache_entry_is_healed(tmp_path):
    code = ("from qsjax.runtime.compilecache import enable_compilation_cache\n"
            "import jax, jax.numpy as jnp\n"
            "enable_compilation_cache(); print(float(jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.ones(4)).sum()))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QSJAX_COMPILATION_CACHE": str(tmp_path)}

    def run():
        return subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=300, text=True)

    first = run()
    assert first.returncode == 0 and first.stderr == "", first.stderr
    entry = next(tmp_path.glob("jit__lambda-*-cache"))
    size = entry.stat().st_size
    entry.write_bytes(entry.read_bytes()[:100])
    damaged = run()
    lines = damaged.stderr.strip().splitlines()
    assert damaged.stdout == first.stdout and len(lines) == 1 and lines[0].startswith("warning: "), damaged.stderr
    assert "site-packages" not in damaged.stderr
    healed = run()
    assert healed.stderr == "" and entry.stat().st_size == size, healed.stderr


# ---------------------------------------------------------------------------------------------
# 9. An unreadable $QSJAX_DATA file is an error, not a silent fallback


def test_unreadable_qsjax_data_file_is_an_error(tmp_path, monkeypatch):
    from qsjax.evaluation.data import DATASETS, DataError, resolve_data

    path = tmp_path / DATASETS["wikitext103"]
    path.parent.mkdir(parents=True)
    path.symlink_to(tmp_path / "missing")  # there, but nothing can be read from it
    monkeypatch.setenv("QSJAX_DATA", str(tmp_path))
    with pytest.raises(DataError, match=str(path)):
        resolve_data("wikitext103")
