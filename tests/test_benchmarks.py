"""The benchmark scripts: bad arguments exit with status 2 and one `error:` line before any model is
loaded (what needs the model's config or tokenizer, before anything is measured), the run order
rotates between repeats, and the attention and dense benchmarks' variants run small and agree."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def run_script(name, *args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout, check=False)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(("script", "args", "message"), [
    ("bench_quicksilver.py", ["--repeats", "0"], "--repeats must be at least 1"),
    ("bench_quicksilver.py", ["--stride", "0"], "--stride must be in 1..--max-length"),
    ("bench_quicksilver.py", ["--max-length", "1024", "--stride", "2048"], "--stride must be in 1..--max-length"),
    ("bench_quicksilver.py", ["--max-eval-tokens", "1"], "--max-eval-tokens must be at least 2"),
    ("bench_quicksilver.py", ["--threads", "0"], "--threads must be at least 1"),
    ("bench_quicksilver.py", ["--json", "/nonexistent-dir/out.json"], "does not exist"),
    ("bench_quicksilver.py", ["--data", "penn"], "invalid choice"),
    ("bench_generate.py", ["--new-tokens", "1"], "--new-tokens must be at least 2"),
    ("bench_generate.py", ["--prompt-tokens", "0"], "--prompt-tokens must be at least 1"),
    ("bench_generate.py", ["--json", "/nonexistent-dir/out.json"], "does not exist"),
    ("bench_projections.py", ["--repeats", "0"], "--repeats must be at least 1"),
    ("bench_projections.py", ["--batches", "1", "0"], "--batches takes positive numbers"),
    ("bench_projections.py", ["--prefill-length", "-1"], "--prefill-length must be at least 0"),
    ("bench_projections.py", ["--json", "/nonexistent-dir/out.json"], "does not exist"),
    ("profile_quicksilver.py", ["--stride", "2048"], "--stride must be in 1..--max-length - 1"),
    ("profile_quicksilver.py", ["--repeats", "0"], "--repeats must be at least 1"),
    ("bench_long.py", ["--settings", "nope"], "unknown setting 'nope'"),
    ("bench_long.py", ["--new-tokens", "1"], "--new-tokens must be at least 2"),
    ("bench_long.py", ["--windows", "0"], "--windows must be at least 1"),
    ("bench_long.py", ["--stride", "8192"], "--stride must be in 1..8191"),
    ("bench_long.py", ["--settings", "truncate-2048", "--max-length", "2048"], "needs --max-length above 2560"),
    ("bench_long.py", ["--plots", "/nonexistent-dir"], "no such directory"),
    ("bench_long.py", ["--json", "/nonexistent-dir/out.json"], "does not exist"),
    ("bench_long.py", ["--replot", "docs/results/long-prompts/bench_long.json"], "--replot needs --plots DIR"),
    ("bench_long.py", ["--replot", "README.md", "--plots", "docs"], "--replot README.md: cannot read a report"),
    ("passkey_margin.py", ["--settings", "nope"], "unknown setting 'nope'"),
    ("passkey_margin.py", ["--settings", "truncate-2048"], "'truncate-2048' is a truncation"),
    ("passkey_margin.py", ["--cells", "4096:0.3"], "--cells 4096:0.3: not a cell of the grid"),
    ("passkey_margin.py", ["--cells", "4096"], "give LENGTH:DEPTH"),
    ("passkey_margin.py", ["--lengths", "0"], "lengths must be positive"),
    ("passkey_margin.py", ["--trials", "0"], "--trials must be at least 1"),
    ("passkey_margin.py", ["--json", "/nonexistent-dir/out.json"], "does not exist"),
    ("bench_speculative.py", ["--repeats", "0"], "--repeats must be at least 1"),
    ("bench_speculative.py", ["--new-tokens", "1"], "--new-tokens must be at least 2"),
    ("bench_speculative.py", ["--prompts", "5"], "--prompts must be at most 4"),
    ("bench_speculative.py", ["--lookup", "4"], "--lookup 4: give K:N"),
    ("bench_speculative.py", ["--lookup", "0:2"], "--lookup 0:2: give K:N"),
    ("bench_speculative.py", ["--hf-lookup", "0"], "--hf-lookup must be at least 1"),
    ("bench_speculative.py", ["--json", "/nonexistent-dir/out.json"], "does not exist"),
    ("bench_decode_long.py", ["--new-tokens", "1"], "--new-tokens must be at least 2"),
    ("bench_decode_long.py", ["--lengths", "4096", "0"], "--lengths takes positive numbers, got 0"),
    ("bench_decode_long.py", ["--lengths", "x"], "invalid int value"),
    ("bench_decode_long.py", ["--repeats", "0"], "--repeats must be at least 1"),
    ("bench_decode_long.py", ["--threads", "0"], "--threads must be at least 1"),
    ("bench_decode_long.py", ["--json", "/nonexistent-dir/out.json"], "does not exist"),
    ("profile_decode_step.py", ["--places", "64"], "--places must be above 64"),
    ("profile_decode_step.py", ["--steps", "0"], "--steps must be at least 1"),
    ("profile_decode_step.py", ["--repeats", "0"], "--repeats must be at least 1"),
    ("profile_decode_step.py", ["--json", "/nonexistent-dir/out.json"], "does not exist"),
    ("bench_amq.py", ["--rows", "dense,foo", "--json", "/tmp/amq.json"], "--rows: unknown row 'foo'"),
    ("bench_amq.py", ["--group-size", "0", "--json", "/tmp/amq.json"], "--group-size must be at least 1"),
    ("bench_amq.py", ["--json", "/nonexistent-dir/out.json"], "does not exist"),
    ("sweep.py", ["--stride", "0"], "--stride must be in 1..--max-length"),
    ("sweep.py", ["--max-length", "x"], "invalid int value"),
    ("sweep.py", ["--max-eval-tokens", "1"], "--max-eval-tokens must be at least 2"),
    ("sweep.py", ["--data", "penn"], "data file penn not found"),
    ("sweep.py", ["--out", "README.md"], "--out README.md is a file"),
    ("sweep.py", ["--out", "/nonexistent-dir/sweep"], "directory /nonexistent-dir does not exist"),
    ("sweep.py", ["--out", "/nonexistent-dir", "--replot"], "--replot: cannot read a sweep"),
    ("sweep.py", ["--out", "docs/results/short-windows/frontier_c4.png", "--replot"], "is a file"),
    ("halting_grid.py", ["--tau-drift", "-1"], "--tau-drift: halt_drift must be >= 0, got -1.0"),
    ("halting_grid.py", ["--tau-entropy", "nan"], "--tau-entropy: halt_entropy must be >= 0, got nan"),
    ("halting_grid.py", ["--tau-entropy", "1", "1.0"], "--tau-entropy: a value is given twice"),
    ("halting_grid.py", ["--min-layer", "L/3"], "invalid choice"),
    ("halting_grid.py", ["--stop-above", "0.5"], "--stop-above 0.5: give 0 (never stop) or a ratio above 1"),
    ("halting_grid.py", ["--protocol", "tail", "--max-eval-tokens", "1024"],
     "--protocol tail needs --stride < --max-length <= --max-eval-tokens (got 512, 2048, 1024)"),
    ("bench_amq.py", ["--json", "x.json", "--protocol", "tail", "--stride", "2048"],
     "--protocol tail needs --stride < --max-length <= --max-eval-tokens (got 2048, 2048, 4096)"),
    ("halting_grid.py", ["--scope", "some"], "invalid choice"),
    ("halting_grid.py", ["--out", "README.md"], "--out README.md is a file"),
    ("halting_grid.py", ["--data", "penn"], "data file penn not found"),
])
def test_argument_errors(script, args, message):
    status, stdout, stderr = run_script(script, *args)
    assert status == 2, stderr
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr


@pytest.mark.slow
def test_decode_long_refuses_prompts_past_the_context(default_model_dir):
    """Checked once the model's config is read (the model fetched first, as the fixture does), before
    anything is measured."""
    status, stdout, stderr = run_script("bench_decode_long.py", "--lengths", "8192")
    assert status == 2 and stdout == "", stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "must fit the model's context (8192 positions)" in lines[0], stderr


def script_module(name):
    sys.path.insert(0, str(SCRIPTS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(SCRIPTS))


def test_rotated_order():
    rotated = script_module("benchlib").rotated
    names = ["a", "b", "c", "d"]
    assert rotated(names, 0) == names
    assert rotated(names, 1) == ["b", "c", "d", "a"]
    assert rotated(names, 5) == ["b", "c", "d", "a"]


def test_replot_merges_reports_setting_by_setting():
    """bench_long --replot: quality sections from two runs (each with its own settings) and a speed
    run together; a figure present in two reports is the later one's."""
    merged = script_module("bench_long").merged
    first = {"args": {"lengths": [8064]}, "settings": {"long": {"policy": "attention"}},
             "perplexity": {"c4": {"qsjax": {"perplexity": 34.8}, "long": {"change": 0.1}}},
             "passkey": {"qsjax": {"accuracy": 0.8}, "long": {"accuracy": 0.9}}}
    second = {"args": {"lengths": [2048]}, "settings": {"hybrid": {"policy": "recent"}},
              "perplexity": {"c4": {"qsjax": {"perplexity": 34.8}, "hybrid": {"change": 0.0}}},
              "passkey": {"qsjax": {"accuracy": 0.8}, "hybrid": {"accuracy": 0.5}}}
    speed = {"args": {"lengths": [8064]}, "settings": {"long": {"policy": "attention"}, "hybrid": {"policy": "recent"}},
             "speed": {"batch_1_prompt_8064": {"long": {"ttft_speedup_vs_qsjax": 2.6}}}}
    report = merged(merged(merged({}, first), second), speed)
    assert report["settings"] == {"long": {"policy": "attention"}, "hybrid": {"policy": "recent"}}
    assert report["perplexity"]["c4"] == {"qsjax": {"perplexity": 34.8}, "long": {"change": 0.1}, "hybrid": {"change": 0.0}}
    assert set(report["passkey"]) == {"qsjax", "long", "hybrid"} and report["args"]["lengths"] == [8064]
    assert report["speed"] == speed["speed"] and first["settings"] == {"long": {"policy": "attention"}}  # inputs untouched


def test_frontier_curves_split_a_policy_by_cut_off_layer():
    """bench_long's frontier: settings of one policy at different cut-off layers are different curves
    (a curve traces the budget); a truncation has no layer."""
    bl = script_module("bench_long")
    settings = {n: bl.recorded(n, 30)
                for n in ("recency-25-c10", "recency-50-c10", "recency-30-c2", "attention-25", "attention-c5", "long",
                          "hybrid-40-r70")}
    curves = {n: bl.curve_name(s) for n, s in settings.items()}
    assert curves["recency-25-c10"] == curves["recency-50-c10"] == "recency, after layer 10"
    assert curves["recency-30-c2"] == "recency, after layer 2"
    assert curves["attention-25"] != curves["attention-c5"] and curves["attention-25"].endswith("after layer 8")
    assert curves["long"] == curves["hybrid-40-r70"]  # the preset is a point of its policy's curve
    assert bl.curve_name({"policy": "truncation", "quicksilver": None, "truncate": 2048}) == "truncation"
    assert settings["long"]["quicksilver"]["halt_cutoff_layer"] == 8 and settings["long"]["truncate"] is None


def test_the_long_reports_in_docs_name_todays_settings():
    """Every setting in docs/results/long-prompts/bench_long*.json is measured with the config (and drawn on the curve) its
    name gives today, so a replot, the README's commands and the figures agree after a rename."""
    bl = script_module("bench_long")
    reports = sorted((ROOT / "docs" / "results" / "long-prompts").glob("bench_long*.json"))
    assert reports
    for path in reports:
        for name, setting in bl.read_report(str(path))["settings"].items():  # older reports read in today's shape
            assert setting == bl.recorded(name, 30), f"{path.name}: {name}"


def test_plots_without_matplotlib_fail_before_any_measurement(monkeypatch):
    """bench_long --plots: a missing matplotlib is found by the argument checks (before the model
    loads), not after an hour of measuring."""
    from test_plots import hide_matplotlib

    bl = script_module("bench_long")
    args = bl.parse_args(["--sections", "passkey", "--plots", "docs"])
    bl.check_args(args)
    hide_matplotlib(monkeypatch)
    with pytest.raises(bl.UsageError, match="--plots needs matplotlib"):
        bl.check_args(args)


def test_truncation_keeps_the_head_and_the_last_tokens():
    cut = script_module("bench_long").cut
    prompts = [list(range(10)), list(range(3))]
    assert cut(prompts, 5, keep=2) == [[0, 1, 7, 8, 9], [0, 1, 2]]
    assert cut(prompts, 4) == [[6, 7, 8, 9], [0, 1, 2]]
    assert cut(prompts, None) is prompts  # a QuickSilver setting or dense: the whole prompt


def test_dense_benchmark_adds_the_xla_variant_on_a_gpu_in_bfloat16(monkeypatch):
    """bench_dense's prefill variants: on a GPU in bfloat16 (where `attention` would hand the window
    to cuDNN) also qsjax's XLA path, so that the library's gain is measured; elsewhere not."""
    import jax

    from qsjax.dense.attention import attention, attention_xla

    variants = script_module("bench_dense").prefill_attentions
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert variants(False, "bfloat16") == {"qsjax": attention}
    assert list(variants(True, "float32")) == ["qsjax", "qsjax_masked_attention"]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert variants(False, "float32") == {"qsjax": attention}  # float32: cuDNN never runs
    assert variants(False, "bfloat16") == {"qsjax": attention, "qsjax_xla_attention": attention_xla}


def test_attention_benchmark_runs_its_block_variants_and_parts(tmp_path):
    """bench_attention end to end at a small length: the extra block sizes and the one-step parts run,
    and every variant agrees with the attention it is measured against (a broken variant, e.g. after
    a change of `_blockwise`'s arguments, fails here rather than in an hour-long run)."""
    import json

    out = tmp_path / "attention.json"
    status, _, stderr = run_script("bench_attention.py", "--lengths", "300", "--repeats", "1", "--blocks", "128x64",
                                   "--parts", "--skip-torch", "--json", out)
    assert status == 0, stderr
    report = json.loads(out.read_text())
    diffs = report["results"][0]["max_abs_diff_vs_masked_attention"]
    assert set(diffs) == {"masked_attention", "attention", "attention_128x64"}
    assert max(diffs.values()) < 1e-5
    assert report["parts"]["seconds"]["step"] > 0


def test_fmt_shows_a_missing_value_at_the_width_of_its_spec():
    """A figure that was not measured (e.g. --skip-hf) is "-", for every spec the tables use."""
    fmt = script_module("benchlib").fmt
    assert fmt(None, "9.2f") == "        -" and fmt(None, "+.3f") == "-" and fmt(None, "+8.3f") == "       -"
    assert fmt(0.5, "+.3f") == "+0.500" and fmt(2.0, "9.2f") == "     2.00"


def test_dense_benchmark_prefill_variants_agree(tiny_models):
    """Every prefill variant bench_dense times (qsjax's attention, the masked baseline it is compared
    with) runs inside the dense model's prefill and gives its logits and cache."""
    from unittest import mock

    import jax.numpy as jnp

    from qsjax.dense import blocks, model as dense

    model, T = tiny_models["llama-gqa"][0], 200  # over 128: the baseline's blocks of 128 queries
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, T)), jnp.int32)
    start = jnp.asarray([0, 5], jnp.int32)
    outs, calls = {}, []
    for name, attention in script_module("bench_dense").prefill_attentions(True, "float32").items():
        def counted(*a, attention=attention, name=name, **kw):
            calls.append(name)
            return attention(*a, **kw)

        with mock.patch.object(blocks, "attention", counted):  # where bench_dense patches it
            outs[name] = dense.prefill(model.module(model.state), tokens, start, T + 8)
    assert set(calls) == {"qsjax", "qsjax_masked_attention"}  # each variant really ran
    (logits, cache), (base_logits, base_cache) = outs["qsjax"], outs["qsjax_masked_attention"]
    np.testing.assert_allclose(logits, base_logits, atol=1e-5)
    for row, first in enumerate(np.asarray(start)):  # the real slots (padding's states differ and are never seen)
        for a, b in ((cache.k[-1], base_cache.k[-1]), (cache.v[-1], base_cache.v[-1])):
            np.testing.assert_allclose(a[row, :, first:T], b[row, :, first:T], atol=1e-5)


@pytest.mark.parametrize(("args", "message"), [
    (["--only", "nothing-like-this"], "--only nothing-like-this: no policy matches"),
    (["--only", "AMQ", "--heatmap", "fast"], "--heatmap fast: not a policy or label"),
    (["--max-length", "4096"], "--max-length 4096 is longer than the model's context (2048)"),
])
def test_sweep_refuses_what_the_model_cannot_run(tmp_path, args, message):
    """Checked from the model's config.json alone (here a 30-layer Llama without weights), before
    anything loads or is written."""
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=30, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=96, max_position_embeddings=2048).save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    status, stdout, stderr = run_script("sweep.py", "--model", tmp_path / "model", "--out", out, *args)
    assert status == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert not out.exists()


@pytest.mark.slow
def test_bench_long_refuses_a_short_passkey_length_before_any_section(default_model_dir):
    """With every section asked for, a passkey length too short for its prompt is refused once the
    tokenizer is read, before the speed section measures for an hour."""
    status, stdout, stderr = run_script("bench_long.py", "--passkey-lengths", "10")
    assert status == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: --passkey-lengths 10 is too short"), stderr
    assert not any("warmed up" in line or "compiled" in line for line in lines), stderr


def test_speculative_benchmark_variants_and_prompts():
    """bench_speculative: each lookup setting once (transformers' K with n-gram 2 always among them,
    and run on the long prompt), the early exit within the model; grounded prompts hold their passage."""
    bs = script_module("bench_speculative")
    args = bs.parse_args(["--lookup", "4:2", "10:2", "8:3", "--hf-lookup", "8"])
    bs.check_args(args)
    vs = {v.name: v for v in bs.variants(args, 30)}
    lookups = [n for n in vs if n.startswith("qsjax_lookup")]
    assert lookups == ["qsjax_lookup_k4_n2", "qsjax_lookup_k10_n2", "qsjax_lookup_k8_n3", "qsjax_lookup_k8_n2"]
    assert [n for n, v in vs.items() if v.long] == ["qsjax_plain", "qsjax_lookup_k8_n2", "hf_plain", "hf_lookup_k8"]
    assert vs["hf_lookup_k8"].reference == "hf_plain" and vs["qsjax_exit_e20_k4"].reference == "qsjax_plain"
    with_exit = bs.parse_args(["--hf-exit"])
    bs.check_args(with_exit)
    assert "hf_exit_e20_k4" in [v.name for v in bs.variants(with_exit, 30)]
    with pytest.raises(bs.UsageError, match="--exit-layer must be below"):
        bs.variants(bs.parse_args(["--exit-layer", "30"]), 30)
    sp = script_module("speculative_prompts")
    docs = ["short", "x" * 800, "y" * 2000, "z" * 1000]
    assert sp.passages(docs, 4) == [1, 3]


def test_speculative_benchmark_figures_from_calls():
    """A group's decode rate is its tokens over its summed median decode seconds; transformers' decode
    time is generate's less the one-token call's; identical means every prompt's tokens match."""
    bs = script_module("bench_speculative")
    calls = [bs.Call(0.5, 2.0, [1, 2, 3, 4, 5]), bs.Call(0.7, 4.0, [1, 2, 3, 4, 5]), bs.Call(0.6, 3.0, [1, 2, 3, 4, 5])]
    cell = bs.prompt_cell(calls, None, [1, 2, 3, 4, 5])
    assert cell["decode_seconds"] == 3.0 and cell["decode_tokens_per_second"] == 4 / 3.0 and cell["first_token_seconds"] == 0.6
    hf = bs.prompt_cell([bs.Call(0.0, 3.5, [1, 2, 9], passes=2)], [bs.Call(0.5, 0.0, [])], [1, 2, 3])
    assert hf["decode_seconds"] == 3.0 and not hf["identical_to_reference"]
    group = bs.group_cell([cell, hf])
    assert group["decode_tokens_per_second"] == 6 / 6.0 and not group["identical"]


@pytest.mark.slow
def test_speculative_benchmark_runs_quick(default_model_dir, tmp_path):
    """bench_speculative --quick end to end (qsjax only): every group and variant measured, the
    drafters' greedy output identical to plain decoding, the verify cost recorded."""
    import json

    out = tmp_path / "spec.json"
    status, stdout, stderr = run_script("bench_speculative.py", "--quick", "--skip-hf", "--json", out, timeout=900)
    assert status == 0, stderr
    report = json.loads(out.read_text())
    assert set(report["groups"]) == {"grounded", "open", "long"}
    for name, group in report["groups"].items():
        for variant, figures in group["variants"].items():
            assert figures["identical"], (name, variant)
            assert figures["decode_tokens_per_second"] > 0
    assert report["groups"]["grounded"]["variants"]["qsjax_lookup_k10_n2"]["acceptance_rate"] > 0
    assert "qsjax_plain" in stdout and report["verify_cost"]["cost_over_plain_step"]["11"] > 0
