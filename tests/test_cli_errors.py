"""Bad input never costs a user their work: `generate`, `eval`, `convert` and `weights` in
subprocesses, one test per class of failure. Each asserts the exit status, a single `error:` line
(or the documented closing lines), no traceback, and that no file is left behind or deleted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import save_tiny_gpt2_with_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "A small model reads a small text, one token at a time."]


def env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "QSJAX_COMPILATION_CACHE": "off", "PYTHONIOENCODING": "utf-8",
            **extra}


def run(module, *args, cwd=ROOT, timeout=300, **extra):
    proc = subprocess.run([sys.executable, "-m", f"qsjax.{module}", *map(str, args)], capture_output=True, text=True,
                          env=env(**extra), cwd=cwd, timeout=timeout, check=False)
    return proc


def assert_one_error(proc, message):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random GPT-2 (64 positions) with its tokenizer and no chat template."""
    return save_tiny_gpt2_with_tokenizer(tmp_path_factory.mktemp("tiny"), SENTENCES, init_std=0.3)


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory):
    """A tiny random GPT-2 with 4,096 positions and no EOS: thousands of streamed tokens take seconds."""
    path = save_tiny_gpt2_with_tokenizer(tmp_path_factory.mktemp("tiny4k"), SENTENCES, n_positions=4096, init_std=0.3)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        config["eos_token_id"] = None
        (path / name).write_text(json.dumps(config))
    return path


def model_copy(tiny: Path, dest: Path, **changes) -> Path:
    """A copy of the tiny model directory with some files replaced (None: removed)."""
    dest.mkdir()
    for f in tiny.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    for name, content in changes.items():
        name = name.replace("__", ".")
        if content is None:
            (dest / name).unlink()
        else:
            (dest / name).write_text(content, encoding="utf-8")
    return dest


# ---------------------------------------------------------------------------------------------
# 1. Every output location is checked before any work; a late failure still shows the results


def test_unwritable_json_fails_before_loading(tiny, tmp_path):
    t0 = time.perf_counter()
    proc = run("eval", "--model", tiny, "--data", "wikitext103", "--json", "/proc/qsjax-report.json")
    assert_one_error(proc, "--json /proc/qsjax-report.json: cannot write in /proc")
    assert time.perf_counter() - t0 < 20 and proc.stdout == ""


def test_late_write_failure_still_prints_the_table(tiny, tmp_path, monkeypatch, capsys):
    from qsjax import eval as qeval
    from qsjax.runtime import cli
    from qsjax.runtime.cli import UsageError

    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setenv("QSJAX_COMPILATION_CACHE", "off")
    monkeypatch.setattr(cli, "write_file_atomic", disk_full)
    with pytest.raises(UsageError, match="No space left on device.*results are in the table above"):
        qeval.main(["--model", str(tiny), "--data", "wikitext103", "--max-eval-tokens", "64", "--max-length", "32",
                    "--stride", "16", "--no-progress", "--json", str(tmp_path / "r.json")])
    assert "perplexity" in capsys.readouterr().out and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 2. convert never deletes its input, the current directory, or a directory that holds no model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_convert import write_tiny_llama

    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    write_tiny_llama(path)
    return path


@pytest.mark.parametrize("case", ["output holds the input", "output is .", "not a model directory"])
def test_convert_never_deletes(tiny_gguf, tmp_path, case):
    folder = tmp_path / "folder"
    folder.mkdir()
    gguf = folder / "model.gguf"
    gguf.write_bytes(tiny_gguf.read_bytes())
    (folder / "notes.txt").write_text("mine")
    gguf, out, cwd, message = {
        "output holds the input": (gguf, folder, ROOT, "contains the input"),
        "output is .": (tiny_gguf, ".", folder, "contains the current directory"),
        "not a model directory": (tiny_gguf, folder, ROOT, "holds no model"),
    }[case]
    before = listing(tmp_path)
    assert_one_error(run("convert", gguf, out, "--force", "--quiet", cwd=cwd), message)
    assert listing(tmp_path) == before and (folder / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("case", ["directory as input", "read-only output", "usage"])
def test_convert_errors_are_one_line(tiny_gguf, tmp_path, case):
    args, message = {
        "directory as input": ([tmp_path, tmp_path / "out"], "is a directory; give the .gguf file"),
        "read-only output": ([tiny_gguf, "/proc/qsjax-model"], "cannot write /proc/qsjax-model"),
        "usage": ([tiny_gguf], "the following arguments are required: out_dir"),
    }[case]
    assert_one_error(run("convert", *args), message)
    assert listing(tmp_path) == []


def test_convert_sigterm_leaves_nothing_and_stale_partials_go(tiny_gguf, tmp_path):
    """SIGTERM while the files are being written: status 143, one line, no partial folder; a partial
    folder left by a killed run (its process gone) is removed by the next run."""
    code = f"""
import os, signal, sys, time
from qsjax import convert
from qsjax.runtime.cli import run_cli
write = convert.write_model_dir
def interrupted(gguf, out, progress=True):
    write(gguf, out, progress=progress)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
convert.write_model_dir = interrupted
run_cli(convert.main, [{str(tiny_gguf)!r}, {str(tmp_path / "out")!r}, "--quiet"])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 143 and proc.stderr.strip() == "interrupted", proc.stderr
    assert listing(tmp_path) == []
    stale = tmp_path / ".out.partial-999999999-0123abcd"  # no such process
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    proc = run("convert", tiny_gguf, tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------------------------
# 3. Optional or derived locations that cannot be written


def test_unwritable_compilation_cache_warns_and_runs(tiny, tmp_path):
    (tmp_path / "cache-is-a-file").write_text("")
    extra = {"XDG_CACHE_HOME": str(tmp_path / "cache-is-a-file"), "QSJAX_COMPILATION_CACHE": ""}
    proc = run("generate", "--model", tiny, "The quick", "--max-new-tokens", 3, **extra)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "compilation cache" in warnings[0] and "running without it" in warnings[0]


def test_weights_location_is_a_file(tmp_path):
    (tmp_path / "weights").write_text("")
    assert_one_error(run("generate", "Hi", QSJAX_WEIGHTS=str(tmp_path / "weights")), "is not a writable directory")


# ---------------------------------------------------------------------------------------------
# 4. Malformed inputs are one line, not a traceback


def test_malformed_inputs(tiny, tmp_path):
    (tmp_path / "prompts").mkdir()
    cases = {
        "no chat template": (["--model", tiny, "--chat", "Hi"], "has no chat template"),
        "broken chat template": (
            ["--model", model_copy(tiny, tmp_path / "badchat", tokenizer_config__json='{"chat_template": "{% if %}"}'),
             "--chat", "Hi"], "chat template cannot be rendered"),
        "no tokenizer.json": (["--model", model_copy(tiny, tmp_path / "notok", tokenizer__json=None), "Hi"],
                              "has no tokenizer.json"),
        "truncated tokenizer.json": (
            ["--model", model_copy(tiny, tmp_path / "trunc", tokenizer__json=(tiny / "tokenizer.json").read_text()[:500]),
             "Hi"], "cannot read its tokenizer"),
        "prompts file is a directory": (["--model", tiny, "--prompts-file", tmp_path / "prompts"], "is a directory"),
        "config.json is a list": (["--model", model_copy(tiny, tmp_path / "list", config__json="[1, 2]"), "Hi"],
                                  "must hold a JSON object, not a list"),
        "zero heads": (["--model", model_copy(tiny, tmp_path / "zero", config__json=json.dumps(
            {**json.loads((tiny / "config.json").read_text()), "n_head": 0})), "Hi"], "n_head=0 must be a positive"),
        "config.json not JSON": (["--model", model_copy(tiny, tmp_path / "notjson", config__json="{"), "Hi"],
                                 "config.json is not valid JSON"),
        "config.json without a field": (["--model", model_copy(tiny, tmp_path / "nofield", config__json=json.dumps(
            {"model_type": "gpt2"})), "Hi"], "config.json has no 'n_embd' field"),
        "index without weight_map": (
            ["--model", model_copy(tiny, tmp_path / "noindex", model__safetensors__index__json="{}"), "Hi"],
            'whose "weight_map" maps'),
    }  # fmt: skip
    for name, (args, message) in cases.items():
        proc = run("generate", *args, "--max-new-tokens", 2)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert_one_error(proc, message)


def test_missing_weight_named_as_in_the_checkpoint(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    model = model_copy(tiny, tmp_path / "partial")
    tensors = load_file(model / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, model / "model.safetensors")
    proc = run("generate", "--model", model, "Hi", "--max-new-tokens", 2)
    assert_one_error(proc, "the checkpoint has no tensor transformer.h.1.mlp.c_fc.weight (shape (32, 128))")


# ---------------------------------------------------------------------------------------------
# 5. Ctrl-C and SIGTERM stop at once, with what was done and no traceback


def wait_for_output(proc, n_bytes, timeout=120):
    os.set_blocking(proc.stdout.fileno(), False)
    got, t0 = b"", time.time()
    while len(got) < n_bytes and time.time() - t0 < timeout and proc.poll() is None:
        got += proc.stdout.read() or b""
        time.sleep(0.02)
    return got


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_streamed_generation(long_tiny, signum):
    command = [sys.executable, "-m", "qsjax.generate", "--model", str(long_tiny), "The quick", "--max-new-tokens", "4000"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    streamed = wait_for_output(proc, 20)
    assert proc.poll() is None, "generation ended before the signal"
    t0 = time.time()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 3, "did not stop within moments"
    assert proc.returncode == 128 + signum and b"Traceback" not in err, err
    lines = err.decode().strip().splitlines()
    assert lines[-1] == "interrupted" and lines[-2].endswith("(stopped by the interrupt)"), err
    new_tokens = int(lines[-2].split("new tokens ")[1].split()[0])
    assert 0 < new_tokens < 4000 and (streamed + out).endswith(b"\n")


def test_interrupt_eval_writes_nothing(long_tiny, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(SENTENCES * 1000))
    (tmp_path / "out").mkdir()
    command = [sys.executable, "-m", "qsjax.eval", "--model", str(long_tiny), "--data", str(data),
               "--max-length", "1024", "--stride", "8", "--json", str(tmp_path / "out" / "r.json")]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    os.set_blocking(proc.stderr.fileno(), False)
    err, t0 = b"", time.time()
    while b"window" not in err and time.time() - t0 < 120:  # the progress bar has started
        err += proc.stderr.read() or b""
        time.sleep(0.05)
    assert proc.poll() is None, err
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=30)
    assert time.time() - t0 < 3, "did not stop within moments"
    assert proc.returncode == 130 and b"Traceback" not in err + rest and (err + rest).strip().endswith(b"interrupted")
    assert listing(tmp_path / "out") == []


# ---------------------------------------------------------------------------------------------
# 6. A closed stdout ends quietly


@pytest.mark.parametrize("prompts", [1, 2], ids=["streamed", "batch"])
def test_broken_pipe_is_quiet(tiny, tmp_path, prompts):
    (tmp_path / "p.txt").write_text("The quick\nA small\n")
    args = ["The quick"] if prompts == 1 else ["--prompts-file", str(tmp_path / "p.txt")]
    command = [sys.executable, "-m", "qsjax.generate", "--model", str(tiny), *args, "--max-new-tokens", "8"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head -c 0`: nobody reads stdout
    proc = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, env=env(), timeout=300, check=False)
    os.close(write_end)
    assert proc.returncode == 141 and b"Traceback" not in proc.stderr and b"Exception" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# 7. (weights: tests/test_weights.py)  8./9. Values that are refused before anything loads, in the flags' words


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "nan", "Hi"], "--temperature must be a number >= 0, got nan"),
        (["--top-p", "nan", "Hi"], "--top-p must be in (0, 1]"),
        (["--fuse-threshold", "2", "Hi"], "--fuse-threshold must be >= -1 and <= 1, got 2.0"),
        (["--seed", str(10**23), "Hi"], "--seed must be a 64-bit integer"),
        (["   "], "empty prompt: give at least one non-whitespace character"),
        (["--halt-cutoff-layer", "99", "Hi"], "QuickSilver options: --halt-cutoff-layer 99 but the model has 2 layers"),
        (["--keep-top-k", "0.5", "--scope", "all", "Hi"], "--halt select (implied by --keep-top-k) needs --halt-cutoff-layer >= 1"),
        (["--halt-drift", "-1", "Hi"], "--halt-drift must be >= 0"),
        (["--halt-cutoff-layer", "1", "--select-pool", "2", "Hi"], "--select-pool must be 0, 1 or an odd window, got 2"),
        (["--halt-cutoff-layer", "1", "--keep-top-k2", "0", "Hi"], "--keep-top-k2 must be > 0"),
        (["--bogus", "Hi"], "unrecognized arguments: --bogus"),
    ],
)  # fmt: skip
def test_refused_values(tiny, tmp_path, args, message):
    """Checked before the weights load: the model given has none, which would be the error otherwise."""
    no_weights = model_copy(tiny, tmp_path / "noweights", model__safetensors=None)
    assert_one_error(run("generate", "--model", no_weights, *args), message)


def test_token_outside_the_vocabulary(tiny, tmp_path):
    config = json.loads((tiny / "config.json").read_text())
    small = model_copy(tiny, tmp_path / "small", config__json=json.dumps({**config, "vocab_size": 100}))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(small / "model.safetensors")
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:100]
    save_file(tensors, small / "model.safetensors")
    assert_one_error(run("generate", "--model", small, "The quick brown fox", "--max-new-tokens", 2),
                     "outside the model's vocabulary (100 ids)")


def test_bom_and_byte_offsets_in_prompts_file(tiny, tmp_path):
    with_bom, plain = tmp_path / "bom.txt", tmp_path / "plain.txt"
    with_bom.write_bytes(b"\xef\xbb\xbfThe quick\n  \nA small\n")
    plain.write_bytes(b"The quick\nA small\n")
    runs = [run("generate", "--model", tiny, "--prompts-file", f, "--max-new-tokens", 2) for f in (with_bom, plain)]
    assert [r.returncode for r in runs] == [0, 0] and runs[0].stdout == runs[1].stdout
    assert runs[0].stderr.splitlines()[-1].split(",")[0] == runs[1].stderr.splitlines()[-1].split(",")[0]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n" * 2000 + b"caf\xe9\n")
    assert_one_error(run("generate", "--model", tiny, "--prompts-file", bad), "(byte 10003, line 2001")


def test_usage_errors_are_one_line():
    assert_one_error(run("weights", "fetch", "nonesuch"), "invalid choice: 'nonesuch'")
    assert_one_error(run("weights"), "the following arguments are required")


# ---------------------------------------------------------------------------------------------
# 10. The report keeps the umask's mode and writes through a symlink


def test_json_report_mode_and_symlink(tiny, tmp_path):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    link.symlink_to(real.name)
    args = ["--model", tiny, "--data", "wikitext103", "--max-eval-tokens", 64, "--max-length", 32, "--stride", 16,
            "--no-progress"]  # fmt: skip
    code = "import os, runpy, sys; os.umask(0o022); sys.argv[0] = 'qsjax.eval'; runpy.run_module('qsjax.eval', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args), "--json", str(link)], capture_output=True,
                          text=True, env=env(), timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and json.loads(real.read_text())["tokens_total"] == 64
    assert real.stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# 11. The evaluation text ships with the package


def test_eval_out_of_the_box(tiny, tmp_path):
    """No $QSJAX_DATA, run from a directory with no ../shared: the shipped WikiText-103 is used."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    extra = {k: v for k, v in env().items() if k != "QSJAX_DATA"}
    proc = subprocess.run([sys.executable, "-m", "qsjax.eval", "--model", str(tiny), "--data", "wikitext103",
                           "--max-eval-tokens", "1024", "--max-length", "64", "--stride", "32", "--json", "-",
                           "--no-progress"], capture_output=True, text=True, env=extra, cwd=work, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["tokens_total"] == 1024 and Path(report["data_path"]).name == "wikitext103_test.txt.gz"


@pytest.mark.slow
def test_eval_out_of_the_box_default_model(default_model_dir, tmp_path):
    """The issue's command, `python -m qsjax.eval --data wikitext103 --max-eval-tokens 1024`, from a
    directory with no ../shared and no $QSJAX_DATA."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    extra = {k: v for k, v in env().items() if k != "QSJAX_DATA"}
    proc = subprocess.run([sys.executable, "-m", "qsjax.eval", "--data", "wikitext103", "--max-eval-tokens", "1024",
                           "--json", "-", "--no-progress"], capture_output=True, text=True, env=extra, cwd=work,
                          timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["tokens_scored"] == 1023 and abs(report["perplexity"] - 14.0851) < 0.01
