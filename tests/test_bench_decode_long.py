"""scripts/bench_decode_long.py: bad arguments exit with status 2 and one `error:` line before any
model is loaded (the context check right after the model's config is read)."""

import pytest

from test_benchmarks import run_script


@pytest.mark.parametrize(("args", "message"), [
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--lengths", "4096", "0"], "--lengths takes positive numbers, got 0"),
    (["--lengths", "x"], "invalid int value"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--json", "/nonexistent-dir/out.json"], "does not exist"),
    (["--lengths", "8192"], "must fit the model's context (8192 positions)"),
])
def test_argument_errors(args, message):
    status, stdout, stderr = run_script("bench_decode_long.py", *args)
    assert status == 2, stderr
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
