"""scripts/bench_decode_long.py and scripts/profile_decode_step.py: bad arguments exit with status 2
and one `error:` line before any model is loaded (the context check right after the model's config
is read)."""

import pytest

from test_benchmarks import run_script


@pytest.mark.parametrize(("script", "args", "message"), [
    ("bench_decode_long.py", ["--new-tokens", "1"], "--new-tokens must be at least 2"),
    ("bench_decode_long.py", ["--lengths", "4096", "0"], "--lengths takes positive numbers, got 0"),
    ("bench_decode_long.py", ["--lengths", "x"], "invalid int value"),
    ("bench_decode_long.py", ["--repeats", "0"], "--repeats must be at least 1"),
    ("bench_decode_long.py", ["--threads", "0"], "--threads must be at least 1"),
    ("bench_decode_long.py", ["--json", "/nonexistent-dir/out.json"], "does not exist"),
    ("bench_decode_long.py", ["--lengths", "8192"], "must fit the model's context (8192 positions)"),
    ("profile_decode_step.py", ["--places", "64"], "--places must be above 64"),
    ("profile_decode_step.py", ["--steps", "0"], "--steps must be at least 1"),
    ("profile_decode_step.py", ["--repeats", "0"], "--repeats must be at least 1"),
    ("profile_decode_step.py", ["--json", "/nonexistent-dir/out.json"], "does not exist"),
])
def test_argument_errors(script, args, message):
    status, stdout, stderr = run_script(script, *args)
    assert status == 2, stderr
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
