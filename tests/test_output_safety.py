"""Nothing the user owns is ever overwritten: an output that is an input is refused, a device, FIFO or
/dev/stdout is written into (never replaced), convert --force replaces only a model directory, a
failing stdout still leaves the --json report, and each refusal names the real problem.  Most checks
run before the model loads, so most tests need no model (one error line, status 2, see
test_cli_errors.py)."""

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import save_tiny_gpt2_with_tokenizer
from test_cli_errors import SENTENCES, assert_one_error, env, run

from qsjax import convert
from qsjax.runtime import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_gpt2_with_tokenizer(tmp_path_factory.mktemp("tiny"), SENTENCES, init_std=0.3)


@pytest.fixture
def config_only(tmp_path):
    """A "model directory" with just a config.json: enough to resolve --model, too little to load."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    return model


# ---------------------------------------------------------------------------------------------
# 1. An output that is one of the command's inputs is refused before anything runs


@pytest.mark.parametrize("command", ["generate", "eval", "passkey-json", "passkey-plot"])
def test_output_that_is_an_input_is_refused(tmp_path, config_only, command):
    source = tmp_path / "input.txt"
    source.write_text("one prompt\nanother prompt\n")
    link = tmp_path / "link.json"
    link.symlink_to(source)  # the same file under another name
    args = {"generate": ("generate", "--prompts-file", source, "--json", link),
            "eval": ("eval", "--data", source, "--json", link),
            "passkey-json": ("passkey", "--haystack", source, "--json", link),
            "passkey-plot": ("passkey", "--haystack", source, "--plot", link)}[command]
    if command == "passkey-plot":
        pytest.importorskip("matplotlib")
    proc = run(*args[:1], "--model", config_only, *args[1:])
    assert_one_error(proc, f"is the input --{args[1].lstrip('-')} ({source})")
    assert source.read_text() == "one prompt\nanother prompt\n"


@pytest.mark.parametrize("command", ["generate", "eval", "passkey"])
def test_output_that_is_the_quicksilver_config_is_refused(tmp_path, config_only, command):
    setting = tmp_path / "setting.json"
    setting.write_text('{"keep_top_k": 0.5}')
    prompt = ("hello",) if command == "generate" else ()
    proc = run(command, *prompt, "--model", config_only, "--quicksilver-config", setting, "--json", setting)
    assert_one_error(proc, f"is the input --quicksilver-config ({setting})")
    assert setting.read_text() == '{"keep_top_k": 0.5}'


def test_output_that_is_a_model_file_is_refused(config_only):
    before = (config_only / "config.json").read_text()
    proc = run("generate", "hello", "--model", config_only, "--json", config_only / "config.json")
    assert_one_error(proc, "is the input model file")
    assert (config_only / "config.json").read_text() == before


def test_hard_link_to_an_input_is_refused(tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_text("a prompt\n")
    os.link(source, tmp_path / "report.json")
    with pytest.raises(cli.UsageError, match="is the input --prompts-file"):
        cli.check_not_inputs([("--json", str(tmp_path / "report.json"))], [("--prompts-file", str(source))])
    cli.check_not_inputs([("--json", str(tmp_path / "new.json"))], [("--prompts-file", str(source))])


# ---------------------------------------------------------------------------------------------
# 2. A device, a FIFO or /dev/stdout is written into, never replaced


def test_device_node_stays_a_device(tmp_path, tiny):
    device = tmp_path / "null"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a copy of /dev/null
    data = tmp_path / "data.txt"
    data.write_text(" ".join(SENTENCES * 4))
    proc = run("eval", "--model", tiny, "--data", data, "--max-length", 16, "--stride", 8, "--json", device,
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(os.stat(device).st_mode)


def test_fifo_is_written_into(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    cli.check_output_file("--json", str(fifo))
    cli.write_output("--json", str(fifo), "the report\n")
    reader.join(timeout=10)
    assert got == ["the report\n"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_dev_stdout_redirected_to_a_file_is_appended_to(tmp_path):
    out = tmp_path / "out.txt"
    code = ("import sys; from qsjax.runtime import cli; print('the table', flush=True); "
            "cli.check_output_file('--json', '/dev/stdout'); cli.write_output('--json', '/dev/stdout', 'the report\\n')")
    with open(out, "w") as f:
        inode = os.fstat(f.fileno()).st_ino
        subprocess.run([sys.executable, "-c", code], stdout=f, env=env(), check=True, timeout=60)
    assert out.read_text() == "the table\nthe report\n"
    assert os.stat(out).st_ino == inode  # the file written into, not renamed over


# ---------------------------------------------------------------------------------------------
# 3. convert --force replaces only a model directory; a new directory is created exclusively


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_convert import write_tiny_llama

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_llama(path)
    return path


def test_force_keeps_a_folder_that_is_not_a_model(tmp_path, tiny_gguf, monkeypatch):
    folder = tmp_path / "thesis"
    (folder / "src").mkdir(parents=True)
    (folder / "config.json").write_text('{"editor": "vim"}')
    (folder / "src" / "main.py").write_text("print('mine')\n")
    (folder / "thesis.tex").write_text("\\documentclass{article}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.UsageError, match="is not a model directory .*no model_type"):
        convert.main([str(tiny_gguf), str(folder), "--force", "--quiet"])
    assert (folder / "src" / "main.py").read_text() == "print('mine')\n"
    assert (folder / "thesis.tex").is_file()
    # a complete model with a foreign file in it is kept too
    model = convert.convert_gguf(tiny_gguf, tmp_path / "model", progress=False)
    (model / "notes.txt").write_text("mine")
    with pytest.raises(cli.UsageError, match="notes.txt is not a model file"):
        convert.main([str(tiny_gguf), str(model), "--force", "--quiet"])
    assert (model / "notes.txt").read_text() == "mine"
    (model / "notes.txt").unlink()
    convert.main([str(tiny_gguf), str(model), "--force", "--quiet"])  # what qsjax wrote is replaced
    assert (model / convert.MANIFEST).is_file()


def test_non_empty_folder_names_the_flag(tmp_path, tiny_gguf, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.UsageError) as error:
        convert.main([str(tiny_gguf), str(tmp_path / "out"), "--quiet"])
    assert "pass --force" in str(error.value) and "overwrite=True" not in str(error.value)


def test_folder_filled_while_converting_is_not_replaced(tmp_path, tiny_gguf, monkeypatch):
    """Two conversions into one new folder: the one that finishes second fails, the first's files stay."""
    out = tmp_path / "out"
    real = convert.write_model_dir

    def racing(gguf_path, partial, progress):
        real(gguf_path, partial, progress=progress)
        monkeypatch.setattr(convert, "write_model_dir", real)
        convert.convert_gguf(gguf_path, out, progress=False)  # the other conversion finishes first

    monkeypatch.setattr(convert, "write_model_dir", racing)
    with pytest.raises(FileExistsError, match="is not empty; pass --force"):
        convert.convert_gguf(tiny_gguf, out, progress=False)
    assert convert.manifest_problems(out, checksums=True) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------
# 4. A failing stdout still leaves the report, and ends with one line


def run_with_stdout(stdout, *args):
    return subprocess.run([sys.executable, "-m", *map(str, args)], stdout=stdout, stderr=subprocess.PIPE, text=True,
                          env=env(), cwd=ROOT, timeout=300, check=False)


def test_full_stdout_still_writes_the_report(tmp_path, tiny):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\nA small model\n")
    report = tmp_path / "report.json"
    with open("/dev/full", "w") as full:
        proc = run_with_stdout(full, "qsjax.generate", "--model", tiny, "--prompts-file", prompts,
                               "--max-new-tokens", 3, "--json", report)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot write to stdout (No space left on device)")
    assert json.loads(report.read_text())["prompts"]


def test_closed_stdout_still_writes_the_report(tmp_path, tiny):
    data = tmp_path / "data.txt"
    data.write_text(" ".join(SENTENCES * 4))
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "qsjax.eval", "--model", tiny, "--data", data, "--max-length", 16,
               "--stride", 8, "--no-progress", "--json", report]
    proc = subprocess.run(["bash", "-c", '"$@" >&-', "bash", *map(str, command)], stderr=subprocess.PIPE, text=True,
                          env=env(), cwd=ROOT, timeout=300, check=False)
    assert_one_error(proc, "cannot write to stdout (stdout is closed); the results are in")
    assert json.loads(report.read_text())["perplexity"] > 0


# ---------------------------------------------------------------------------------------------
# 10. Messages name the real problem


def test_symlink_into_a_missing_folder_names_the_target(tmp_path):
    link = tmp_path / "report.json"
    link.symlink_to(tmp_path / "gone" / "report.json")
    with pytest.raises(cli.UsageError, match=f"whose directory {tmp_path / 'gone'} does not exist"):
        cli.check_output_file("--json", str(link))


def test_model_messages(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    assert_one_error(run("generate", "hi", "--model", file), f"--model {file} is a file; pass a Hugging Face model "
                                                              "directory")
    assert_one_error(run("generate", "hi", "--model", ""), "--model is empty")
