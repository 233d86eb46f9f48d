"""Long prompts: time to first token, decode speed, KV cache size, perplexity and retrieval of dense
qsjax, QuickSilver settings and transformers (PyTorch), in one run.

    python scripts/bench_long.py --json docs/results/long-prompts/bench_long.json

The default model, float32. Settings are named in `long_settings.SETTINGS` (`long` is the preset;
the others are the frontier's points, one curve per policy and cut-off layer, and `truncate-2048`,
the plain alternative: dense qsjax on the last 2,048 tokens of each prompt); `--settings` picks them
(default: long).
Sections (`--sections`, all by default):
- speed: one prompt of each --lengths (WikiText-103 text) per row, --batches rows: greedy generation
  of --new-tokens tokens by dense qsjax, each setting (compacted) and transformers `generate`. qsjax
  times its prefill program (time to first token) and its decode program (decode tokens/s: tokens
  after each row's first per second) apart; transformers' time to first token is a run of one new
  token, its decode tokens/s = rows x (new tokens - 1) / (time of all - time of one). Every qsjax
  program is compiled first (compile seconds apart) and every run warmed up once; each repeat runs
  every variant of a case, the order rotated; medians; ratios from this run. `kv_cache_bytes`: the
  bytes of the cache each qsjax variant decodes from (its arrays' real sizes), beside the dense one.
- perplexity: the tail protocol (--max-length 8192, --stride 512: every scored token sees 7,680
  tokens of context) over --windows windows of WikiText-103 and of the C4 sample, dense and each
  setting, overall and per window (`window_perplexity`); deterministic: the figures do not depend on
  the machine's load.
- passkey: `qsjax.passkey`'s grid (--passkey-lengths x --depths, --trials keys per cell, the filler
  haystack) for dense and each setting.
`--plots DIR` draws the passkey heatmaps (dense and each setting) and the frontiers (perplexity change
and passkey accuracy against the time-to-first-token speed-up at the longest length, batch 1) from the
report; `--replot REPORT [REPORT ...] --plots DIR` draws them from earlier reports merged setting by
setting, measuring nothing (e.g. the speed section measured alone on an idle machine, the quality
sections in other runs).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from benchlib import (check_json_path, check_positive, fmt, load_hf, log, machine, median, ratio, rotated, torch_run,
                      write_report)
from long_settings import SETTINGS, config, recorded, truncation, upgraded
from long_settings import check as check_settings
from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli, write_output
from qsjax.evaluation.plots import require as require_matplotlib

SECTIONS = ("speed", "perplexity", "passkey")
ANSWER_TOKENS = 10  # passkey: new tokens per answer (qsjax.passkey's default)


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/bench_long.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE (- for stdout)")
    p.add_argument("--plots", metavar="DIR", help="draw the heatmaps and frontiers into DIR (needs matplotlib)")
    p.add_argument("--replot", metavar="JSON", nargs="+",
                   help="measure nothing: draw --plots DIR from earlier reports (their sections together; a later "
                        "report's section replaces an earlier one's)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure")
    p.add_argument("--settings", nargs="+", default=["long"], help=f"QuickSilver settings: {', '.join(SETTINGS)}")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8064],
                   help="speed: prompt lengths (default 2048 4096 8064: 8,064 + 128 new tokens fill the 8,192 context)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="speed: rows per batch (default 1 4)")
    p.add_argument("--new-tokens", type=int, default=128, help="speed: new tokens per row (default 128)")
    p.add_argument("--repeats", type=int, default=2, help="speed: timed repeats, medians reported (default 2)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (default 2)")
    p.add_argument("--skip-hf", action="store_true", help="speed: leave out transformers")
    p.add_argument("--max-length", type=int, default=8192, help="perplexity: window (default 8192)")
    p.add_argument("--stride", type=int, default=512, help="perplexity: scored tokens per window (default 512)")
    p.add_argument("--windows", type=int, default=8, help="perplexity: windows per data set (default 8)")
    p.add_argument("--passkey-lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="passkey lengths")
    p.add_argument("--depths", type=int, default=5, help="passkey: depths from 0%% to 100%% (default 5)")
    p.add_argument("--trials", type=int, default=1, help="passkey: keys per cell (default 1)")
    return p.parse_args(argv)


def check_args(args) -> None:
    check_positive(args, "repeats", "threads", "windows", "depths", "trials")
    if args.new_tokens < 2:
        raise UsageError(f"--new-tokens must be at least 2 (decode speed is measured past the first), got {args.new_tokens}")
    check_settings(args.settings)
    if min(args.lengths + args.batches + args.passkey_lengths) < 1:
        raise UsageError("--lengths, --batches and --passkey-lengths take positive numbers")
    if not 0 < args.stride < args.max_length:
        raise UsageError(f"--stride must be in 1..{args.max_length - 1} (the window keeps context), got {args.stride}")
    short = [truncation(s) for s in args.settings if truncation(s) is not None]
    if "perplexity" in args.sections and short and max(short) + args.stride >= args.max_length:
        raise UsageError(f"a truncation to {max(short)} tokens needs --max-length above {max(short) + args.stride}")
    check_json_path(args.json)
    if args.plots is not None and not Path(args.plots).is_dir():
        raise UsageError(f"--plots {args.plots}: no such directory")
    if args.plots is not None:
        require_matplotlib("--plots")
    if args.replot is not None and args.plots is None:
        raise UsageError("--replot needs --plots DIR (where to draw)")


def read_report(path: str) -> dict:
    """An earlier report of this script (--replot), or UsageError."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--replot {path}: cannot read a report ({e})") from None
    if not isinstance(report, dict) or not {"args", "settings"} <= report.keys():
        raise UsageError(f"--replot {path}: not a report of scripts/bench_long.py")
    return {**report, "settings": {name: upgraded(s) for name, s in report["settings"].items()}}


def merged(earlier: dict, later: dict) -> dict:
    """Reports (or parts of them) merged key by key, nested dicts in depth: a later report adds its
    settings to an earlier one's sections; a figure both hold is the later one's."""
    both = lambda k, v: isinstance(v, dict) and isinstance(earlier.get(k), dict)
    return {**earlier, **{k: merged(earlier[k], v) if both(k, v) else v for k, v in later.items()}}


def generators(model, tokenizer, configs: dict) -> dict:
    """A generator per variant: dense qsjax, each QuickSilver setting, dense again for a truncation."""
    from qsjax.runtime.generator import Generator

    make = lambda qs: Generator(model, tokenizer) if isinstance(qs, int) else Generator(model, tokenizer, qs)
    return {"qsjax": Generator(model, tokenizer), **{name: make(qs) for name, qs in configs.items()}}


def cut(prompts, qs, keep: int = 0):
    """The prompts a variant sees: a truncation keeps the first `keep` tokens and the last qs - keep."""
    if not isinstance(qs, int):
        return prompts
    return [p if len(p) <= qs else p[:keep] + p[len(p) - (qs - keep):] for p in prompts]


def speed(args, model, tokenizer, stream, configs: dict, hf) -> dict:
    """Time to first token, decode tokens/s and cache bytes per (batch, length) case."""
    gens = generators(model, tokenizer, configs)
    cases = {(B, P): [stream[i * P:(i + 1) * P].tolist() for i in range(B)] for B in args.batches for P in args.lengths}
    runs, first = {}, {}
    for case, prompts in cases.items():
        for name, gen in gens.items():  # qsjax times its prefill and decode programs apart
            runs[case, name] = lambda g=gen, p=cut(prompts, configs.get(name)): g(p, max_new_tokens=args.new_tokens)
            first[case, name] = runs[case, name]()  # compiles (timed apart) and warms up
            log(f"compiled and warmed up {case} {name}: {first[case, name].seconds_compile:.1f} s compiling")
        if hf is not None:  # transformers: one new token, then all of them
            for n in (1, args.new_tokens):
                runs[case, f"hf_{n}"] = lambda p=prompts, n=n: hf_generate(hf, p, n)
                runs[case, f"hf_{n}"]()
    samples = {key: [] for key in runs}
    for r in range(args.repeats):
        for case in cases:
            for key in rotated([k for k in runs if k[0] == case], r):
                t0 = time.perf_counter()
                result = runs[key]()
                seconds = time.perf_counter() - t0
                samples[key].append(seconds if key[1].startswith("hf_") else
                                    (result.seconds_first_token, result.decode_tokens_per_second))
        log(f"speed: repeat {r + 1}/{args.repeats} done")
    out = {}
    for (B, P) in cases:
        entry = {}
        for name in gens:
            got = samples[(B, P), name]
            entry[name] = dict(ttft_seconds=median([t for t, _ in got]), ttft_seconds_all=[t for t, _ in got],
                               decode_tokens_per_second=median([d for _, d in got if d is not None]),
                               seconds_compile=first[(B, P), name].seconds_compile,
                               kv_cache_bytes=first[(B, P), name].kv_cache_bytes["this_setting"],
                               kv_cache_bytes_dense=first[(B, P), name].kv_cache_bytes["dense"])
        if hf is not None:
            one, full = median(samples[(B, P), "hf_1"]), median(samples[(B, P), f"hf_{args.new_tokens}"])
            entry["hf"] = dict(ttft_seconds=one, seconds=full, kv_cache_bytes=None,
                               decode_tokens_per_second=B * (args.new_tokens - 1) / (full - one) if full > one else None)
        for e in entry.values():
            for base in ("qsjax", "hf"):
                b = entry.get(base, {})
                e[f"ttft_speedup_vs_{base}"] = ratio(b.get("ttft_seconds"), e["ttft_seconds"])
                e[f"decode_speedup_vs_{base}"] = ratio(e["decode_tokens_per_second"], b.get("decode_tokens_per_second"))
        out[f"batch_{B}_prompt_{P}"] = entry
    return out


def hf_generate(hf, prompts, n: int):
    import torch

    ids = torch.tensor(prompts, dtype=torch.int64, device=hf.device)
    return torch_run(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                         do_sample=False, eos_token_id=None, pad_token_id=0))


def perplexity(args, model, tokenizer, configs: dict) -> dict:
    """Tail-protocol perplexity per data set: dense and each setting, with the change over dense."""
    from qsjax.evaluation.data import read_text, resolve_data, tokenize
    from qsjax.evaluation.perplexity import Scorer, evaluate, tail_windows
    from qsjax.quicksilver.scorer import QuickSilverScorer, evaluate_quicksilver

    out = {}
    for data in ("wikitext103", "c4"):
        stream = tokenize(tokenizer, read_text(resolve_data(data)), args.max_length + args.stride * (args.windows - 1))
        windows = tail_windows(len(stream), args.max_length, args.stride)
        per_window = lambda r: [float(np.exp(np.mean(r.token_nll[w.first_scored:w.end]))) for w in windows]
        dense = evaluate(Scorer(model), stream, windows, progress=True, desc=f"{data} dense")
        entry = {"qsjax": dict(perplexity=dense.perplexity, seconds=dense.seconds, windows=len(windows),
                               window_perplexity=per_window(dense))}
        for name, qs in configs.items():
            if isinstance(qs, int):  # the same scored tokens, each seeing qs tokens of context
                short = tail_windows(len(stream), qs + args.stride, args.stride)[-len(windows):]
                result, reduction = evaluate(Scorer(model), stream, short, progress=True, desc=f"{data} {name}"), None
            else:
                result, stats, _ = evaluate_quicksilver(QuickSilverScorer(model, qs), stream, windows, progress=True)
                reduction = stats["executed_flops_reduction"]
            entry[name] = dict(perplexity=result.perplexity, change=result.perplexity - dense.perplexity,
                               seconds=result.seconds, speedup=dense.seconds / result.seconds, flops_reduction=reduction,
                               window_perplexity=per_window(result))
            log(f"{data} {name}: perplexity {result.perplexity:.4f} ({result.perplexity - dense.perplexity:+.4f})")
        out[data] = entry
    return out


def passkey_cells(args, tokenizer) -> list[dict]:
    """qsjax.passkey's grid (built before any section runs: a length too short is refused at once)."""
    from qsjax.evaluation.passkey_task import FILLER, depth_fractions, make_cells

    return make_cells(tokenizer, FILLER + " ", args.passkey_lengths, depth_fractions(args.depths), args.trials, 0,
                      ANSWER_TOKENS, False, flag="--passkey-lengths")


def passkey(args, model, tokenizer, configs: dict, cells: list[dict]) -> dict:
    """qsjax.passkey's grid, dense and each setting: accuracy overall and per cell."""
    from qsjax.evaluation.passkey_task import prompt_frame, run_cells

    head = len(prompt_frame(tokenizer, False)[0])  # BOS and the instruction
    out = {}
    for name, gen in generators(model, tokenizer, configs).items():
        qs = configs.get(name)
        n = qs - ANSWER_TOKENS if isinstance(qs, int) else qs  # a passkey length counts the answer too
        seen = [{**c, "prompts": cut(c["prompts"], n, head)} for c in cells]
        run = run_cells(gen, seen, ANSWER_TOKENS, True, name)
        out[name] = dict(accuracy=run["accuracy"], seconds=run["seconds"],
                         cells=[{k: c[k] for k in ("length", "depth", "correct", "trials_run", "accuracy")}
                                for c in run["cells"]])
        log(f"passkey {name}: accuracy {run['accuracy']:.3f}")
    return out


def format_table(report: dict) -> str:
    lines = []
    if "speed" in report:
        lines.append(f"{'case':>22} {'variant':16} {'TTFT s':>8} {'vs qsjax':>8} {'vs hf':>6} {'decode tok/s':>12} "
                     f"{'vs qsjax':>8} {'vs hf':>6} {'KV MB':>8}")
        for case, entry in report["speed"].items():
            for v, e in entry.items():
                mb = None if e["kv_cache_bytes"] is None else e["kv_cache_bytes"] / 2**20
                lines.append(f"{case:>22} {v:16} {e['ttft_seconds']:8.2f} {fmt(e['ttft_speedup_vs_qsjax'], '8.2f')} "
                             f"{fmt(e['ttft_speedup_vs_hf'], '6.2f')} {fmt(e['decode_tokens_per_second'], '12.1f')} "
                             f"{fmt(e['decode_speedup_vs_qsjax'], '8.2f')} {fmt(e['decode_speedup_vs_hf'], '6.2f')} "
                             f"{fmt(mb, '8.1f')}")
    for data, entry in report.get("perplexity", {}).items():
        for v, e in entry.items():
            lines.append(f"perplexity {data:12} {v:16} {e['perplexity']:9.4f} {e.get('change', 0.0):+8.4f}")
    for v, e in report.get("passkey", {}).items():
        lines.append(f"passkey {v:16} accuracy {e['accuracy']:.3f}")
    return "\n".join(lines)


def plot(report: dict, out: Path) -> list[Path]:
    """long_passkey.png: the passkey heatmaps of dense and each setting, side by side; with the speed
    section, long_frontier_<data>.png: perplexity change vs TTFT speed-up, and long_frontier_passkey.png:
    passkey accuracy vs the same speed-up (the longest prompt, batch 1). -> the files written."""
    from qsjax.evaluation.passkey_task import accuracy_matrix
    from qsjax.evaluation.plots import Axes, Point, frontier_figure, passkey_grids

    written = []
    if "passkey" in report:
        cells = report["passkey"]["qsjax"]["cells"]
        lengths, depths = (sorted({c[key] for c in cells}) for key in ("length", "depth"))
        runs = [("dense" if n == "qsjax" else n, run["accuracy"], accuracy_matrix(run, lengths, depths))
                for n, run in report["passkey"].items()]
        written.append(out / "long_passkey.png")
        write_output("--out", str(written[-1]), passkey_grids(runs, lengths, depths))
    if "speed" not in report:
        return written
    speed = report["speed"][f"batch_1_prompt_{max(report['args']['lengths'])}"]
    settings = report["settings"]
    names = [n for n in settings if n in speed]
    point = lambda n, y: Point(curve_name(settings[n]), settings[n]["label"], speed[n]["ttft_speedup_vs_qsjax"], y)
    for data, entry in report.get("perplexity", {}).items():
        points = [point(n, entry[n]["change"]) for n in names if n in entry]
        axes = Axes("time-to-first-token speed-up vs dense qsjax (x)", "perplexity change vs dense", (0.5, 4.0),
                    (-0.25, 2.0), band=(-0.25, 0.2), band_label="within +0.2")
        written.append(out / f"long_frontier_{data}.png")
        write_output("--out", str(written[-1]), frontier_figure(points, axes, f"long prompts, {data}", Point("dense", "dense", 1.0, 0.0)))
    if "passkey" in report:
        pk = report["passkey"]
        points = [point(n, pk[n]["accuracy"]) for n in names if n in pk]
        axes = Axes("time-to-first-token speed-up vs dense qsjax (x)", "passkey accuracy", (0.5, 4.0), (0.0, 1.05))
        written.append(out / "long_frontier_passkey.png")
        write_output("--out", str(written[-1]), frontier_figure(points, axes, "long prompts, passkey",
                                                Point("dense", "dense", 1.0, pk["qsjax"]["accuracy"])))
    return written


def curve_name(setting: dict) -> str:
    """A frontier curve: the setting's policy after its cut-off layer (a curve traces the budget)."""
    layer = (setting["quicksilver"] or {}).get("halt_cutoff_layer")
    return setting["policy"] if layer is None else f"{setting['policy']}, after layer {layer}"


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    if args.replot is not None:
        report = {}
        for path in args.replot:
            report = merged(report, read_report(path))
        for path in plot(report, Path(args.plots)):
            log(f"wrote {path}")
        return 0
    from qsjax.runtime.compilecache import enable_compilation_cache
    from qsjax.evaluation.data import read_text, resolve_data, tokenize
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.checkpoints.tokenizer import load_tokenizer
    from qsjax.weights import resolve_model

    model_dir = resolve_model(None)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    need = {"speed": max(args.lengths) + args.new_tokens, "perplexity": args.max_length,
            "passkey": max(args.passkey_lengths)}  # a passkey length is prompt and answer together
    for section in args.sections:
        if need[section] > model.cfg.max_positions:
            raise UsageError(f"{section}: {need[section]} tokens do not fit the model's context ({model.cfg.max_positions})")
    cells = passkey_cells(args, tokenizer) if "passkey" in args.sections else None
    enable_compilation_cache()
    L = model.cfg.n_layers
    configs = {name: config(name, L) for name in args.settings}
    report = {"command": " ".join(["python", "scripts/bench_long.py", *(sys.argv[1:] if argv is None else argv)]),
              "args": vars(args), "model": model_dir.name, "machine_at_start": machine(),
              "settings": {name: recorded(name, L) for name in args.settings}}
    if "speed" in args.sections:
        stream = tokenize(tokenizer, read_text(resolve_data("wikitext103"))).astype(np.int32)
        hf = None if args.skip_hf else load_hf(model_dir, args.threads)
        report["speed"] = speed(args, model, tokenizer, stream, configs, hf)
    if "perplexity" in args.sections:
        report["perplexity"] = perplexity(args, model, tokenizer, configs)
    if "passkey" in args.sections:
        report["passkey"] = passkey(args, model, tokenizer, configs, cells)
    report["load_average_at_end"] = machine()["load_average"]
    if args.plots is not None:
        for path in plot(report, Path(args.plots)):
            log(f"wrote {path}")
    return write_report(args.json, report, format_table(report))


if __name__ == "__main__":
    run_cli(main)
