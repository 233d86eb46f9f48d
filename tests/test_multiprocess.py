"""Several processes as one JAX runtime (qsjax.runtime.distributed), on this machine: two processes with 4
CPU devices each join through a coordinator on localhost and run `qsjax.eval` / `qsjax.generate`
with --mesh data=2,model=4 over all 8 devices (rows split over the two processes, heads and MLP over
each one's 4 devices). Their results must be the single-process ones, computed in this process on one
device: perplexity within 1e-5, the same greedy text, the same QuickSilver decisions; process 0
alone writes stdout, --json and the progress bar. Then the failure modes: the flags checked before
anything loads, an error in one process stopping both, a coordinator that cannot be reached."""

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import save_tiny_gpt2_with_tokenizer, save_tiny_llama_with_tokenizer

from qsjax import eval as eval_cli
from qsjax import generate as generate_cli
from qsjax.runtime.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model reads a small text, one token at a time.",
    "Perplexity is the exponential of the mean negative log-likelihood.",
]
TEXT = "\n\n".join(SENTENCES * 4)
MESH = ["--mesh", "data=2,model=4"]
# four windows of 32 tokens, each scoring its last 16 (QuickSilver acts on the 16 before), two per
# batch, split over "data": one compiled program
EVAL = ["--protocol", "tail", "--max-length", "32", "--stride", "16", "--max-eval-tokens", "80", "--batch-size", "2"]
# a depth cut-off after layer 1, run masked (the compacted program compiles ~5x longer; the two
# execute the same decisions, see tests/test_quicksilver_forward.py)
QUICKSILVER = ["--halt-cutoff-layer", "1", "--kv-skip", "mask", "--masked-reference"]
DECISIONS = ("tokens_halted", "tokens_fused", "kv_writes_skipped_fraction", "fraction_token_layers_executed")
SUMMARY = re.compile(r"prompt tokens (\d+), new tokens (\d+), .*? tokens/s(, quicksilver: [\d.]+%.*)?")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> directory of a random tiny model with a BPE tokenizer, data.txt and prompts.txt."""
    out = {}
    for name, save in (("llama", save_tiny_llama_with_tokenizer), ("gpt2", save_tiny_gpt2_with_tokenizer)):
        path = save(tmp_path_factory.mktemp(f"multiprocess-{name}"), SENTENCES, init_std=0.3)
        (path / "data.txt").write_text(TEXT, encoding="utf-8")
        (path / "prompts.txt").write_text("The quick brown\nA small model reads\n", encoding="utf-8")
        out[name] = path
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def distributed(port: int, process: int, timeout: float = 60) -> list[str]:
    return ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(process),
            "--coordinator-timeout", str(timeout)]


def run_processes(module: str, argvs: list[list[str]], timeout: float = 240) -> list[tuple[int, str, str]]:
    """Start `python -m module` once per argv, each with 4 CPU devices; -> (status, stdout, stderr) of each."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "QSJAX_COMPILATION_CACHE": "off"}
    procs = [subprocess.Popen([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, cwd=ROOT) for argv in argvs]
    results, deadline = [], time.monotonic() + timeout
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out.decode("utf-8"), err.decode("utf-8")))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def run_pair(module: str, argv: list[str], timeout: float = 240) -> list[tuple[int, str, str]]:
    port = free_port()
    return run_processes(module, [[*argv, *distributed(port, i)] for i in range(2)], timeout)


def run_here(cli, argv: list[str], monkeypatch) -> tuple[str, str]:
    """The command in this process (one device, no mesh): -> its stdout and stderr."""
    monkeypatch.setenv("QSJAX_COMPILATION_CACHE", "off")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli.main(argv) == 0
    return out.getvalue(), err.getvalue()


def check_pair_ran(results) -> None:
    for i, (status, _, err) in enumerate(results):
        assert status == 0, f"process {i}:\n{err[-3000:]}"
    assert results[1][1] == "", results[1][1]  # process 1 writes nothing on stdout


@pytest.mark.parametrize("name, flags", [("llama", []), ("gpt2", QUICKSILVER)], ids=["llama", "gpt2-quicksilver"])
def test_eval_two_processes(models, name, flags, tmp_path, monkeypatch):
    """Perplexity on 2 processes x 4 devices equals one device's; only process 0 writes."""
    path = models[name]
    argv = ["--model", str(path), "--data", str(path / "data.txt"), *EVAL, *flags]
    single = json.loads(run_here(eval_cli, [*argv, "--json", "-", "--no-progress"], monkeypatch)[0])
    port, reports = free_port(), [tmp_path / "report0.json", tmp_path / "report1.json"]
    results = run_processes("qsjax.eval", [[*argv, *MESH, "--json", str(reports[i]), *distributed(port, i)]
                                           for i in range(2)])
    check_pair_ran(results)
    assert not reports[1].exists()  # process 1 writes no report
    report = json.loads(reports[0].read_text())
    assert "perplexity" in results[0][1] and "mesh               data 2, model 4" in results[0][1]  # the table
    assert "window/s" in results[0][2] and "window/s" not in results[1][2]  # the progress bar: process 0 only
    assert report["mesh"] == {"data": 2, "model": 4}
    assert report["windows"] == single["windows"] == 4 and report["forwards"] == single["forwards"] == 2
    assert report["tokens_scored"] == single["tokens_scored"] == 64
    assert abs(report["nll_mean"] - single["nll_mean"]) <= TOL, (report["nll_mean"], single["nll_mean"])
    if flags:
        decisions = {key: report["quicksilver"][key] for key in DECISIONS}
        assert decisions == {key: single["quicksilver"][key] for key in DECISIONS}
        assert decisions["tokens_halted"] > 0  # the mechanism did act


@pytest.mark.parametrize("name, flags", [
    ("gpt2", ["--prompts-file", "{path}/prompts.txt", *QUICKSILVER]),  # two prompts: split over "data", i.e. processes
    ("llama", ["The quick brown"]),  # one prompt, streamed, whole on every device
], ids=["gpt2-quicksilver-batch", "llama-streamed"])
def test_generate_two_processes(models, name, flags, monkeypatch):
    """Greedy text on 2 processes x 4 devices equals one device's; only process 0 writes."""
    path = models[name]
    argv = ["--model", str(path), "--max-new-tokens", "4", *(f.format(path=path) for f in flags)]
    single, single_err = run_here(generate_cli, argv, monkeypatch)
    results = run_pair("qsjax.generate", [*argv, *MESH])
    check_pair_ran(results)
    assert results[0][1] == single and single.strip()
    assert "generating with" in results[0][2] and "generating with" not in results[1][2]
    # the closing line: prompt and new tokens, and under QuickSilver the share of prompt token-layers it ran
    closing, expected = (SUMMARY.fullmatch(err.strip().splitlines()[-1]) for err in (results[0][2], single_err))
    assert closing and expected and closing.groups() == expected.groups(), (results[0][2], single_err)
    assert int(closing[2]) > 0 and (closing[3] is not None) == ("--halt-cutoff-layer" in flags)


@pytest.mark.parametrize("cli", [eval_cli, generate_cli], ids=["eval", "generate"])
@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "localhost:1234"], "--coordinator also needs --num-processes and --process-id"),
    (["--num-processes", "2", "--process-id", "0"], "--num-processes and --process-id also need --coordinator"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "expected HOST:PORT"),
    (["--coordinator", "localhost:70000", "--num-processes", "2", "--process-id", "0"], "port in 1..65535"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id must be in 0..1"),
    (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"], "--num-processes must be positive"),
    (["--coordinator-timeout", "5"], "--coordinator-timeout needs --coordinator"),
    (["--coordinator", "h:1", "--num-processes", "1", "--process-id", "0", "--coordinator-timeout", "0"],
     "--coordinator-timeout must be a positive number"),
])
def test_flag_errors(cli, flags, message, capsys):
    """Checked before any model or data is read: one line, status 2."""
    with pytest.raises(SystemExit) as e:
        run_cli(cli.main, ["--model", "no/such/model", *flags, *(["hello"] if cli is generate_cli else [])])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


GLOO = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of connected peer ranks is : \d+\n")


def error_lines(stderr: str) -> list[str]:
    """stderr's `error:` lines (and no traceback), less the connection lines JAX's CPU collectives
    print, one per device thread: those may interleave mid-line ("[Gloo] Rank [Gloo] Rank 0 is ...\n0
    is ..."), nested ones are removed until none is left; any other runtime output (CI once saw a
    second line, its text not kept) is not an error line."""
    assert "Traceback" not in stderr, stderr
    while (fewer := GLOO.sub("", stderr)) != stderr:
        stderr = fewer
    return [line for line in stderr.splitlines() if "error:" in line]


def test_error_in_one_process_stops_both(models):
    """Process 1 cannot find its model: it says so, process 0 says which process failed and why, and
    both end with status 2 rather than process 0 waiting for process 1 in its first collective."""
    path = models["gpt2"]
    port = free_port()
    argvs = [["--model", str(model), *MESH, "--max-new-tokens", "2", "hi", *distributed(port, i)]
             for i, model in enumerate((path, path / "missing"))]
    t0 = time.monotonic()
    (status0, out0, err0), (status1, out1, err1) = run_processes("qsjax.generate", argvs, timeout=120)
    assert (status0, status1, out0, out1) == (2, 2, "", "")
    assert time.monotonic() - t0 < 60
    [line1], [line0] = error_lines(err1), error_lines(err0)
    assert line1.startswith(f"error: --model {path / 'missing'}"), err1
    assert line0 == f"error: process 1: {line1.removeprefix('error: ')}", err0


def test_coordinator_failures(models):
    """Three processes alone, at once: process 1 whose coordinator never comes, process 0 whose
    peer never comes (both wait --coordinator-timeout 3 s), and process 0 on a port something else
    holds (at once): each ends with one `error:` line, status 2."""
    ports = [free_port(), free_port()]
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        ports.append(holder.getsockname()[1])
        t0 = time.monotonic()
        results = run_processes("qsjax.eval", [["--model", str(models["gpt2"]), *distributed(port, process, timeout=3)]
                                               for port, process in zip(ports, (1, 0, 0))], timeout=60)
    seconds = time.monotonic() - t0
    messages = [f"cannot reach the coordinator (process 0) at localhost:{ports[0]} within 3 s (this is process 1); "
                "start every process with the same --coordinator",
                "not all 2 processes joined within 3 s (this is process 0)",
                f"process 0 serves the coordinator on port {ports[2]}, but it is taken on this host"]
    assert seconds < 30, seconds
    for port, message, (status, out, err) in zip(ports, messages, results):
        assert (status, out) == (2, ""), err
        assert err.count("\n") == 1 and err.startswith(f"error: --coordinator localhost:{port}: {message}"), err
