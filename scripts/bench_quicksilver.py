"""QuickSilver `fast` against dense qsjax and Hugging Face PyTorch perplexity scoring, on the real
default model, in one run.

    python scripts/bench_quicksilver.py --json bench_quicksilver.json

Perplexity: SmolLM2-135M-Instruct (float32) on WikiText-103 test and the C4 sample, strided
protocol (--max-length 2048 --stride 512), the first --max-eval-tokens tokens of each (default
16,384: 29 windows; 0: the whole stream), one window per forward pass, four variants over the same
windows and scored tokens, all driven by the same loop (`qsjax.evaluation.perplexity.evaluate`):

    dense_qsjax      qsjax.evaluation.perplexity.Scorer (the LM head on scored positions only)
    fast_masked      QuickSilver preset `fast`, every row run and masked (the reference semantics)
    fast_compacted   QuickSilver preset `fast`, only the computing rows run (the preset as shipped)
    hf_dense         transformers LlamaForCausalLM from the same GGUF, torch float32 (benchlib.HFScorer)

Every shape is compiled and every variant run once on the first window before the clock starts;
each repeat runs every variant once per data set, the order rotated from repeat to repeat; `seconds`
is the median of the scoring loop's wall-clock time. FLOPs follow `qsjax.evaluation.flops`' one convention
(needed work; QuickSilver: what its decisions leave plus its overhead). Generation is measured by
scripts/bench_generate.py, where one window's time goes by scripts/profile_quicksilver.py.
`targets` lists the targets with the measured value; nothing is asserted. Run it on an otherwise
idle machine: PyTorch's threads slow down many times over when another process holds the cores.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from benchlib import (HFScorer, check_json_path, check_positive, check_strided, fmt, load_hf, log, machine, median, ratio,
                      rotated, write_report)
from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli

DATASETS = ("wikitext103", "c4")


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/bench_quicksilver.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE (- for stdout)")
    p.add_argument("--data", nargs="+", default=list(DATASETS), choices=DATASETS, help="data sets (default: both)")
    p.add_argument("--max-eval-tokens", type=int, default=16384,
                   help="keep the first N tokens of each stream (default 16384; 0: the whole stream)")
    p.add_argument("--max-length", type=int, default=2048, help="strided window length (default 2048)")
    p.add_argument("--stride", type=int, default=512, help="strided step (default 512)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported (default 3)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (default 2)")
    p.add_argument("--skip-hf", action="store_true", help="leave out Hugging Face PyTorch")
    p.add_argument("--hf-all-logits", action="store_true",
                   help="Hugging Face: compute the logits of every position (default: scored positions only)")
    p.add_argument("--compilation-cache", action="store_true",
                   help="use qsjax's persistent compilation cache (compile seconds then mostly read it from disk)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Checks that need neither the model nor the data."""
    if args.max_eval_tokens != 0 and args.max_eval_tokens < 2:
        raise UsageError(f"--max-eval-tokens must be at least 2 (or 0 for the whole stream), got {args.max_eval_tokens}")
    check_strided(args)
    check_positive(args, "repeats", "threads")
    check_json_path(args.json)


def variants(model, hf_scorer, qs) -> dict:
    """name -> (scorer, run(stream, windows) -> (PerplexityResult, QuickSilver statistics or None))."""
    from qsjax.evaluation.perplexity import Scorer, evaluate
    from qsjax.quicksilver.scorer import QuickSilverScorer, evaluate_quicksilver

    dense = Scorer(model)
    out = {"dense_qsjax": (dense, lambda stream, windows: (evaluate(dense, stream, windows, progress=False), None))}
    for name, compact in (("fast_masked", False), ("fast_compacted", True)):
        scorer = QuickSilverScorer(model, dataclasses.replace(qs, compact=compact))
        out[name] = (scorer, lambda stream, windows, s=scorer: evaluate_quicksilver(s, stream, windows, progress=False)[:2])
    if hf_scorer is not None:
        out["hf_dense"] = (hf_scorer, lambda stream, windows: (evaluate(hf_scorer, stream, windows, progress=False), None))
    return out


def warm_up(scorer, stream, windows) -> tuple[float, float]:
    """Compile every shape, then score the first window once.  -> (seconds compiling, seconds of that forward)"""
    from qsjax.evaluation.perplexity import make_batches

    batches = make_batches(windows, 1)
    compile_s = sum(scorer.compile(*key) for key in dict.fromkeys(b.key for b in batches))
    b = batches[0]
    t0 = time.perf_counter()
    scorer.score(b.tokens(stream), np.array([w.length for w in b.windows], np.int32), b.offset)
    return compile_s, time.perf_counter() - t0


def bench_perplexity(data: str, stream: np.ndarray, windows, runs: dict, repeats: int) -> dict:
    """Warm up every variant, then `repeats` interleaved runs.  -> the data set's report."""
    entry = {name: {"seconds_all": []} for name in runs}
    for name, (scorer, _) in runs.items():
        compile_s, warm_s = warm_up(scorer, stream, windows)
        entry[name].update(seconds_compile=compile_s, seconds_warmup=warm_s)
        log(f"[{data}] {name}: compiled in {compile_s:.1f} s, warm-up forward {warm_s:.2f} s")
    results, orders = {}, []
    for r in range(repeats):
        orders.append(rotated(runs, r))
        for name in orders[-1]:
            result, stats = runs[name][1](stream, windows)
            entry[name]["seconds_all"].append(result.seconds)
            results[name] = (result, stats)
            log(f"[{data}] repeat {r + 1}/{repeats} {name}: {result.seconds:.1f} s, "
                f"{result.tokens_per_second:.1f} tokens/s, perplexity {result.perplexity:.4f}")

    for name, e in entry.items():
        result, stats = results[name]
        seconds = median(e["seconds_all"])
        e.update(seconds=seconds, seconds_with_compile=seconds + e["seconds_compile"], tokens_scored=result.tokens_scored,
                 tokens_per_second=result.tokens_scored / seconds, perplexity=result.perplexity, nll_mean=result.nll_mean,
                 flops_total=result.flops.total, flops_per_token=result.flops.total / result.tokens_scored,
                 flops=result.flops.to_json(result.tokens_scored))
        if stats is not None:
            for key in ("executed_flops_reduction", "fraction_token_layers_executed", "kv_writes_skipped_fraction"):
                e[key] = stats[key]
    dense = entry["dense_qsjax"]
    for name, e in entry.items():
        e["speedup_vs_dense_qsjax"] = ratio(dense["seconds"], e["seconds"])
        e["speedup_with_compile_vs_dense_qsjax"] = ratio(dense["seconds_with_compile"], e["seconds_with_compile"])
        hf = entry.get("hf_dense")
        e["speedup_vs_hf"] = ratio(hf["seconds"], e["seconds"]) if hf else None
        e["speedup_with_compile_vs_hf"] = ratio(hf["seconds_with_compile"], e["seconds_with_compile"]) if hf else None
        e["perplexity_minus_dense_qsjax"] = e["perplexity"] - dense["perplexity"]
        e["flops_vs_dense_qsjax"] = e["flops_total"] / dense["flops_total"]  # the same convention on both sides

    def nll_diff(a, b):
        x, y = results[a][0].token_nll, results[b][0].token_nll
        both = np.isfinite(x) & np.isfinite(y)
        return float(np.abs(x[both] - y[both]).max()), int((np.isfinite(x) != np.isfinite(y)).sum())

    checks = {"masked_minus_compacted_perplexity": entry["fast_masked"]["perplexity"] - entry["fast_compacted"]["perplexity"]}
    checks["masked_vs_compacted_max_token_nll_difference"], checks["masked_vs_compacted_scored_positions_differ"] = \
        nll_diff("fast_masked", "fast_compacted")
    if "hf_dense" in entry:
        diff = entry["hf_dense"]["perplexity"] - dense["perplexity"]
        d, n = nll_diff("hf_dense", "dense_qsjax")
        checks.update(hf_minus_dense_qsjax_perplexity=diff, hf_agrees_within_0_01=abs(diff) <= 0.01,
                      hf_vs_dense_qsjax_max_token_nll_difference=d, hf_vs_dense_qsjax_scored_positions_differ=n)
    return {"tokens_total": len(stream), "windows": len(windows), "tokens_scored": dense["tokens_scored"],
            "order": orders, "variants": entry, "checks": checks}


def targets(report: dict) -> list[dict]:
    out = []

    def add(name, target, measured, ok, **extra):
        out.append({"name": name, "target": target, "measured": measured,
                    "met": None if measured is None else bool(ok(measured)), **extra})

    for data, d in report["perplexity"].items():
        v = d["variants"]
        add(f"fast_perplexity_increase_{data}", "<= +0.2 perplexity vs dense qsjax",
            v["fast_compacted"]["perplexity_minus_dense_qsjax"], lambda x: x <= 0.2, data=data)
        add(f"fast_evaluation_speedup_{data}", ">= 1.25x dense qsjax wall-clock (median seconds, compile excluded)",
            v["fast_compacted"]["speedup_vs_dense_qsjax"], lambda x: x >= 1.25, data=data)
        add(f"dense_qsjax_vs_hf_tokens_per_second_{data}", ">= 1.2x Hugging Face PyTorch scored tokens/s",
            v["dense_qsjax"]["speedup_vs_hf"], lambda x: x >= 1.2, data=data)
    return out


def format_table(report: dict) -> str:
    lines = []
    for data, d in report["perplexity"].items():
        lines.append(f"{data}: {d['tokens_scored']:,} tokens scored in {d['windows']} windows "
                     f"(strided {report['protocol']['max_length']}/{report['protocol']['stride']})")
        lines.append(f"  {'variant':16} {'ppl':>9} {'seconds':>9} {'+compile':>9} {'tok/s':>8} {'GFLOP/tok':>10} "
                     f"{'vs dense':>9} {'vs hf':>7}")
        for name, e in d["variants"].items():
            lines.append(f"  {name:16} {e['perplexity']:9.4f} {e['seconds']:9.2f} {e['seconds_compile']:9.2f} "
                         f"{e['tokens_per_second']:8.1f} {e['flops_per_token'] / 1e9:10.3f} "
                         f"{fmt(e['speedup_vs_dense_qsjax'], '9.2f')} {fmt(e['speedup_vs_hf'], '7.2f')}")
    lines.append("targets:")
    for t in report["targets"]:
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"  {t['name']:48} {fmt(t['measured'], '+.3f'):>8}  {t['target']}: {met}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    t_start = time.perf_counter()
    from qsjax.runtime.compilecache import enable_compilation_cache
    from qsjax.evaluation.data import read_text, resolve_data, tokenize
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.evaluation.perplexity import strided_windows
    from qsjax.quicksilver.settings import preset
    from qsjax.checkpoints.tokenizer import load_tokenizer
    from qsjax.weights import resolve_model

    cache = str(enable_compilation_cache()) if args.compilation_cache else None
    data_paths = {name: resolve_data(name) for name in args.data}
    model_dir = resolve_model(None)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    cfg = model.cfg
    if args.max_length > cfg.max_positions:
        raise UsageError(f"--max-length {args.max_length} is longer than the model's context ({cfg.max_positions})")
    qs = preset("fast", cfg.n_layers)
    hf_scorer = None if args.skip_hf else HFScorer(load_hf(model_dir, args.threads), cfg, args.hf_all_logits)
    report = {
        "command": " ".join(["python", "scripts/bench_quicksilver.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": model_dir.name, "dtype": "float32", "machine_at_start": machine(), "compilation_cache": cache,
        "repeats": args.repeats, "torch_threads": args.threads,
        "settings": {"quicksilver": dataclasses.asdict(qs), "quicksilver_preset": "fast"},  # as qsjax's reports
        "hf_lm_head": hf_scorer.lm_head if hf_scorer else None,
        "protocol": {"name": "strided", "max_length": args.max_length, "stride": args.stride},
        "max_eval_tokens": args.max_eval_tokens or None, "perplexity": {},
    }
    for data, path in data_paths.items():
        full = tokenize(tokenizer, read_text(path))
        stream = full[: args.max_eval_tokens or None]
        if len(stream) < 2:
            raise UsageError(f"{data} gives {len(stream)} token(s); at least 2 are needed")
        windows = strided_windows(len(stream), args.max_length, args.stride)
        log(f"[{data}] {len(stream):,} tokens, {len(windows)} windows")
        report["perplexity"][data] = bench_perplexity(data, stream, windows, variants(model, hf_scorer, qs), args.repeats)
        report["perplexity"][data]["tokens_total_in_data"] = len(full)
    report["targets"] = targets(report)
    report["seconds_total"] = time.perf_counter() - t_start
    report["load_average_at_end"] = machine()["load_average"]
    return write_report(args.json, report, format_table(report))


if __name__ == "__main__":
    run_cli(main)
