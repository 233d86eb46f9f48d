"""scripts/bench_quicksilver.py without a benchmark: bad arguments exit with status 2 and one
`error:` line before any model is loaded, and the run order rotates between repeats."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_quicksilver.py"


def run_script(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120, check=False)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--stride", "0"], "--stride must be in 1..--max-length"),
    (["--max-length", "1024", "--stride", "2048"], "--stride must be in 1..--max-length"),
    (["--max-eval-tokens", "1"], "--max-eval-tokens must be at least 2"),
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--prompt-tokens", "0"], "--prompt-tokens must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--skip-perplexity", "--skip-generate", "--skip-profile"], "leave nothing to measure"),
    (["--json", "/nonexistent-dir/out.json"], "does not exist"),
    (["--data", "penn"], "invalid choice"),
])
def test_argument_errors(args, message):
    status, stdout, stderr = run_script(*args)
    assert status == 2, stderr
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr


def test_rotated_order():
    spec = importlib.util.spec_from_file_location("bench_quicksilver", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = ["a", "b", "c", "d"]
    assert module.rotated(names, 0) == names
    assert module.rotated(names, 1) == ["b", "c", "d", "a"]
    assert module.rotated(names, 5) == ["b", "c", "d", "a"]
