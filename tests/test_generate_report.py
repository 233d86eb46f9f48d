"""`python -m qsjax.generate --json FILE` and the Generator's timings, counts and cache bytes, on the
tiny random GPT-2 (32 positions) of test_generate_cli: the report's keys and types, counts equal to
the tokens really generated, the dense KV cache's bytes against the analytic L x 2 x B x K x S x Dh x
item size, QuickSilver's statistics, batches, and a bad --json path refused before the model loads."""

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest
from conftest import save_tiny_gpt2_with_tokenizer
from test_generate_cli import ROOT, SENTENCES, run_generate

from qsjax.runtime.buckets import cache_slots, prompt_bucket
from qsjax.runtime.generator import Generator
from qsjax.checkpoints.hf_params import load_model
from qsjax.quicksilver.settings import QuickSilverConfig
from qsjax.checkpoints.tokenizer import load_tokenizer

CLOSING = re.compile(r"prompt tokens (\d+), new tokens (\d+), compile ([\d.]+) s \((\d+) compiled programs\), "
                     r"first token ([\d.]+) s, decode ([\d.]+|n/a) tokens/s(, quicksilver: [^,]*)?(, speculation: .*)?")
MAX_NEW = 8


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """test_generate_cli's random GPT-2 with 32 positions and a BPE tokenizer of the same vocabulary."""
    return save_tiny_gpt2_with_tokenizer(tmp_path_factory.mktemp("tiny-gpt2-32"), SENTENCES, n_positions=32, init_std=0.3)


def dense_bytes(cfg, batch: int, longest_prompt: int, itemsize: int) -> int:
    """The dense KVCache: K and V of every layer [B, K, S, Dh], each layer's int32 slot per place [B, S] and
    fill place, its int32 row starts [B] and write index."""
    S = cache_slots(prompt_bucket(longest_prompt, cfg.max_positions), MAX_NEW)
    L = cfg.n_layers
    return L * 2 * batch * cfg.n_kv_heads * S * cfg.head_dim * itemsize + 4 * (L * batch * S + L + batch + 1)


def generate_json(tmp_path, model, *args):
    """Run the CLI with --json; -> (report, stdout, closing-line match)."""
    path = tmp_path / "report.json"
    status, out, err = run_generate("--model", model, "--max-new-tokens", MAX_NEW, "--json", path, *args)
    assert status == 0, err
    m = CLOSING.fullmatch(err.strip().splitlines()[-1])
    assert m, err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # written atomically
    return json.loads(path.read_text(encoding="utf-8")), out, m


def check_common(report: dict, prompts: list[str], tokenizer, m) -> None:
    """Keys, types and counts that every report has."""
    assert set(report) == {"settings", "prompts", "prompt_tokens", "new_tokens", "ttft_seconds", "decode_seconds",
                           "decode_tokens_per_second", "compile_seconds", "programs_compiled", "kv_cache_bytes",
                           "quicksilver", "speculation", "weights"}
    s = report["settings"]
    assert s["batch_size"] == len(prompts) and s["max_new_tokens"] == MAX_NEW
    assert set(s["sampling"]) == {"do_sample", "temperature", "top_k", "top_p", "seed"}
    assert [p["prompt"] for p in report["prompts"]] == prompts
    for p in report["prompts"]:
        assert p["prompt_tokens"] == len(tokenizer.encode(p["prompt"]))
        assert p["new_tokens"] == len(p["token_ids"]) <= MAX_NEW and p["text"] == tokenizer.decode(p["token_ids"])
    assert report["prompt_tokens"] == sum(p["prompt_tokens"] for p in report["prompts"]) == int(m[1])
    assert report["new_tokens"] == sum(p["new_tokens"] for p in report["prompts"]) == int(m[2])
    assert report["programs_compiled"] == int(m[4]) == 2  # the prefill and the decode loop
    for key in ("ttft_seconds", "decode_seconds", "compile_seconds"):
        assert isinstance(report[key], float) and report[key] > 0, key
    after_first = sum(max(0, p["new_tokens"] - 1) for p in report["prompts"])
    if after_first:
        assert report["decode_tokens_per_second"] == pytest.approx(after_first / report["decode_seconds"])
    else:
        assert report["decode_tokens_per_second"] is None and m[6] == "n/a"
    assert set(report["kv_cache_bytes"]) == {"dense", "this_setting"}
    w, qs = report["weights"], report["settings"]["quicksilver"]
    assert w["bytes"] > 0 and w["amq_store"] == (None if not qs or qs["amq_layer"] is None else "naive")


def test_report_dense_single_prompt(tiny_gpt2, tmp_path):
    report, out, m = generate_json(tmp_path, tiny_gpt2, "The quick brown")
    tokenizer = load_tokenizer(tiny_gpt2)
    check_common(report, ["The quick brown"], tokenizer, m)
    assert out == report["prompts"][0]["text"] + "\n"
    cfg = load_model(tiny_gpt2).cfg
    n = report["prompts"][0]["prompt_tokens"]
    assert report["kv_cache_bytes"] == {"dense": dense_bytes(cfg, 1, n, 4), "this_setting": dense_bytes(cfg, 1, n, 4)}
    assert report["settings"]["quicksilver"] is None and report["quicksilver"] is None
    assert report["settings"]["speculation"] is None and report["speculation"] is None and not m[8]
    assert report["settings"]["dtype"] == "float32"


def test_report_speculation(tiny_gpt2, tmp_path):
    """Prompt lookup: the settings, and drafts, acceptance and tokens per step that add up; the text
    is plain decoding's."""
    prompt = "The quick brown The quick brown The"
    plain, _, _ = generate_json(tmp_path, tiny_gpt2, prompt)
    report, out, m = generate_json(tmp_path, tiny_gpt2, prompt, "--prompt-lookup-num-tokens", 4,
                                   "--max-matching-ngram-size", 3)
    check_common(report, [prompt], load_tokenizer(tiny_gpt2), m)
    assert report["prompts"][0]["token_ids"] == plain["prompts"][0]["token_ids"]
    assert report["settings"]["speculation"] == {"method": "lookup", "num_tokens": 4, "max_ngram": 3,
                                                 "skip": {"attention": [], "mlp": []}, "exit_layer": None,
                                                 "break_even": 1.0}
    spec = report["speculation"]
    assert spec["tokens"] == report["new_tokens"] - 1 and spec["accepted"] <= spec["drafted"]
    assert spec["steps"] == spec["row_steps"] and spec["mean_tokens_per_step"] == spec["tokens"] / spec["steps"]
    assert spec["acceptance_rate"] == (spec["accepted"] / spec["drafted"] if spec["drafted"] else None)
    assert m[8] and m[7] is None


def test_report_batch_bfloat16_quicksilver(tiny_gpt2, tmp_path):
    """Two prompts, bfloat16, the paper preset in scope all (generated tokens decide too) with
    Matryoshka widths from layer 1."""
    prompts = ["The quick brown fox", "A small"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    report, out, m = generate_json(tmp_path, tiny_gpt2, "--prompts-file", tmp_path / "prompts.txt", "--dtype",
                                   "bfloat16", "--quicksilver", "paper", "--scope", "all", "--amq-layer", "1")
    tokenizer = load_tokenizer(tiny_gpt2)
    check_common(report, prompts, tokenizer, m)
    assert out == "\n----\n".join(p["text"] for p in report["prompts"]) + "\n"
    cfg = load_model(tiny_gpt2).cfg
    longest = max(p["prompt_tokens"] for p in report["prompts"])
    S = cache_slots(prompt_bucket(longest, cfg.max_positions), MAX_NEW)
    dense = dense_bytes(cfg, 2, longest, 2)
    assert report["kv_cache_bytes"]["dense"] == dense
    assert report["kv_cache_bytes"]["this_setting"] >= dense + cfg.n_layers * 2 * S  # + visibility per layer and slot
    assert report["settings"]["quicksilver"]["scope"] == "all" and m[7]
    prompt, generated = report["quicksilver"]["prompt"], report["quicksilver"]["generated"]
    assert prompt["tokens"] == report["prompt_tokens"]
    assert prompt["tokens_full_depth"] + prompt["tokens_halted"] + prompt["tokens_fused"] == prompt["tokens"]
    assert len(prompt["computing_tokens_per_layer"]) == cfg.n_layers
    assert max(prompt["computing_tokens_per_layer"]) <= prompt["tokens"]
    assert prompt["fraction_token_layers_executed"] == pytest.approx(
        sum(prompt["computing_tokens_per_layer"]) / (prompt["tokens"] * cfg.n_layers))
    # a row's tokens go through a decode step until it is done: all but its last, unless that was EOS
    decoded = sum(p["new_tokens"] - (p["new_tokens"] == MAX_NEW) for p in report["prompts"])
    assert generated["decided"] and generated["tokens"] == decoded
    assert generated["tokens_full_depth"] + generated["tokens_halted"] == decoded
    assert sum(generated["bits_histogram"].values()) == decoded


def test_generator_scope_context_timings_and_reuse(tiny_gpt2):
    """scope context: generated tokens run every layer (said so, not invented); a second call reuses
    its programs (prefill, compaction of the cache, decode loop: no compile time), and the dense cache's
    figure is what a dense run allocates."""
    model, tokenizer = load_model(tiny_gpt2, "bfloat16"), load_tokenizer(tiny_gpt2)
    qs = QuickSilverConfig(scope="context", halt="cutoff", halt_cutoff_layer=1, kv_skip="mask")  # as `fast`
    gen = Generator(model, tokenizer, qs)
    ids = [gen.encode(s) for s in ("The quick brown fox jumps", "A small model reads")]
    first = gen(ids, max_new_tokens=MAX_NEW)
    again = gen(ids, max_new_tokens=MAX_NEW)
    assert gen.programs == 3 and first.seconds_compile > 0 and again.seconds_compile == 0
    assert again.token_ids == first.token_ids and again.seconds_first_token > 0 and again.seconds_decode > 0
    generated = first.quicksilver["generated"]
    assert not generated["decided"] and generated["tokens_halted"] == generated["fusions"] == 0
    assert generated["tokens"] == sum(len(t) - (len(t) == MAX_NEW) for t in first.token_ids)
    assert generated["fraction_token_layers_executed"] == 1.0 and generated["bits_histogram"] is None
    assert first.quicksilver["prompt"]["tokens_halted"] > 0  # the cut-off acted on the prompt
    dense = Generator(model, tokenizer)(ids, max_new_tokens=MAX_NEW)
    assert first.kv_cache_bytes["dense"] == dense.kv_cache_bytes["dense"] == dense.kv_cache_bytes["this_setting"]
    assert dense.kv_cache_bytes["dense"] == dense_bytes(model.cfg, 2, max(map(len, ids)), jnp.dtype("bfloat16").itemsize)


@pytest.mark.parametrize("case", ["missing directory", "a directory", "stdout"])
def test_bad_json_path_refused_before_the_model(tmp_path, case):
    """Checked with the arguments alone: the model named does not even exist."""
    path = {"missing directory": tmp_path / "nowhere" / "r.json", "a directory": tmp_path, "stdout": "-"}[case]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QSJAX_COMPILATION_CACHE": "off"}
    command = [sys.executable, "-m", "qsjax.generate", "--model", str(tmp_path / "no-model"), "Hi", "--json", str(path)]
    proc = subprocess.run(command, capture_output=True, env=env, cwd=ROOT, timeout=300, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.startswith("error: --json") and len(err.strip().splitlines()) == 1, err
    assert proc.stdout == b"" and not (tmp_path / "nowhere").exists()
