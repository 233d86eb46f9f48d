"""The quality / executed-FLOPs frontier of QuickSilver's mechanisms and policies.

    python scripts/sweep.py --out sweep/ --max-eval-tokens 8192

Evaluates the default model (or --model) on WikiText-103 test and the C4 sample with the strided
protocol (--max-length 2048 --stride 512 by default): dense, then each mechanism and policy alone
and combined, under both scopes. Writes `sweep.json`, `sweep.csv`, two plots per dataset
(`frontier_<data>.png`: perplexity increase vs executed-FLOP reduction, one curve per policy;
`frontier_wallclock_<data>.png`: the same against the wall-clock speed-up of the scoring loop over
dense qsjax, each variant timed once, compilation excluded) and a per-token heatmap of halting
layer / fusion / bits for one window (`heatmap_<data>.png`).
`--replot` redraws the frontiers of a finished sweep (OUT/sweep.json) without evaluating anything.
Matplotlib is needed for the plots (`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

from benchlib import add_protocol, check_protocol, windows_of
from qsjax.runtime.cli import ArgumentParser, UsageError, exit_on_interrupt, run_cli, write_output
from qsjax.evaluation.data import resolve_data
from qsjax.evaluation.plots import decision_map, sweep_frontiers
from qsjax.evaluation.plots import require as require_matplotlib
from qsjax.quicksilver.settings import QuickSilverConfig, preset


def variants(n_layers: int) -> list[tuple[str, str, QuickSilverConfig]]:
    """(policy curve, label, config) for every point of the sweep."""
    L = n_layers
    out = [("paper", "paper preset", preset("paper", L)), ("fast", "fast preset", preset("fast", L)),
           ("long", "long preset", preset("long", L))]
    for tau in (0.045, 0.4):  # the paper's rule, every token may halt
        out.append(("all: drift+entropy", f"tau_d={tau}", QuickSilverConfig(
            scope="all", halt="drift", halt_min_layer=L // 4, halt_drift=tau, halt_entropy=1.15, kv_skip="mask")))
    out.append(("all: cut-off", f"c={L - 2}", QuickSilverConfig(scope="all", halt="cutoff", halt_cutoff_layer=L - 2,
                                                                kv_skip="propagate")))
    out.append(("all: fusion", "tau_f=0.9", QuickSilverConfig(scope="all", fuse_threshold=0.9, halt_min_layer=L // 4)))
    out.append(("all: AMQ", "1.0/3.0", QuickSilverConfig(scope="all", amq_layer=L // 2 + 1, amq_low=1.0, amq_high=3.0)))
    for mode in ("propagate", "mask"):
        for c in (L - 2, L - 5, L - 7, L - 10):
            out.append((f"context: cut-off, {mode}", f"c={c}", QuickSilverConfig(halt="cutoff", halt_cutoff_layer=c, kv_skip=mode)))
    for c in (L - 7, L - 10):  # layer-wise K/V: propagated for 4 layers above the cut-off, masked beyond
        out.append(("context: cut-off, propagate 4 then mask", f"c={c}", QuickSilverConfig(
            halt="cutoff", halt_cutoff_layer=c, kv_skip="propagate", kv_propagate_span=4)))
    out.append(("context: cut-off, zero", f"c={L - 8}", QuickSilverConfig(halt="cutoff", halt_cutoff_layer=L - 8, kv_skip="zero")))
    for keep, layers in ((0.5, (L // 3, L // 2, 2 * L // 3)), (0.25, (2 * L // 3, 4 * L // 5))):
        for c in layers:
            out.append((f"context: select recency {keep:.0%}", f"c={c}", QuickSilverConfig(
                halt="select", select_signal="recency", halt_cutoff_layer=c, keep_top_k=keep, kv_skip="mask")))
    out.append(("context: select attention 50%", f"c={L // 2}", QuickSilverConfig(
        halt="select", select_signal="attention", halt_cutoff_layer=L // 2, keep_top_k=0.5, kv_skip="mask")))
    out.append(("context: fusion", "tau_f=0.9", QuickSilverConfig(fuse_threshold=0.9, halt_min_layer=L // 4)))
    out.append(("context: cut-off + fusion", f"c={L - 5}", QuickSilverConfig(
        halt="cutoff", halt_cutoff_layer=L - 5, kv_skip="mask", fuse_threshold=0.9, halt_min_layer=L // 4)))
    out.append(("context: AMQ", "1.0/3.0", QuickSilverConfig(amq_layer=L // 2 + 1, amq_low=1.0, amq_high=3.0)))
    return out


def plot_frontiers(rows: list[dict], data: str, out: Path) -> list[Path]:
    """frontier_<data>.png and frontier_wallclock_<data>.png in `out` (`plots.sweep_frontiers`)."""
    written = []
    for name, figure in sweep_frontiers(rows, data).items():
        write_output("--out", str(out / name), figure)
        written.append(out / name)
    return written


def heatmap(decision: dict, tokenizer, n_layers: int, n_tokens: int = 96) -> bytes:
    """The decisions on the last `n_tokens` of context before a window's scored part."""
    start = max(0, len(decision["tokens"]) - n_tokens - 512)
    sl = slice(start, start + n_tokens)
    labels = [tokenizer.decode([t]).replace("\n", "\\n")[:8] for t in decision["tokens"][sl]]
    return decision_map(decision["halt_layer"][sl], decision["fused"][sl], decision["bits"][sl], labels, n_layers)


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/sweep.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a Hugging Face model directory (default: the default model)")
    p.add_argument("--data", nargs="+", default=["wikitext103", "c4"], help="wikitext103, c4 or text files")
    p.add_argument("--out", default="sweep", help="the directory to write into (created; default sweep)")
    add_protocol(p, max_eval_tokens=8192)
    p.add_argument("--only", nargs="*", help="run only the policies whose name contains one of these words")
    p.add_argument("--heatmap", help="the policy (curve name) or label whose decisions the heatmap shows "
                                     "(default: fast, when it runs)")
    p.add_argument("--replot", action="store_true", help="only redraw the frontiers from OUT/sweep.json")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Checks that need neither the model nor the data's tokens: the numbers, the data files, --out,
    and for --replot the finished sweep (read into args.rows)."""
    check_protocol(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory")
    if args.replot:
        require_matplotlib("--replot")
        try:
            args.rows = json.loads((out / "sweep.json").read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--replot: cannot read a sweep from {out / 'sweep.json'} ({e})") from None
        return
    if not out.exists() and not out.parent.is_dir():
        raise UsageError(f"--out {args.out}: directory {out.parent} does not exist")
    for data in args.data:
        resolve_data(data)


def pick_variants(args, n_layers: int) -> list[tuple[str, str, QuickSilverConfig]]:
    """The variants --only selects; UsageError when --only, or a --heatmap given, names none of them."""
    todo = [v for v in variants(n_layers) if not args.only or any(w in v[0] for w in args.only)]
    if not todo:
        raise UsageError(f"--only {' '.join(args.only)}: no policy matches "
                         f"(policies: {', '.join(dict.fromkeys(v[0] for v in variants(n_layers)))})")
    if args.heatmap is not None and not any(args.heatmap in (policy, label) for policy, label, _ in todo):
        raise UsageError(f"--heatmap {args.heatmap}: not a policy or label of the variants this sweep runs")
    return todo


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    out = Path(args.out)
    if args.replot:
        for data in dict.fromkeys(r["data"] for r in args.rows):
            for path in plot_frontiers(args.rows, data, out):
                print(f"wrote {path}", file=sys.stderr)
        return 0
    run_sweep(args, lambda n_layers: pick_variants(args, n_layers))
    return 0


def run_sweep(args, pick, csv_fields: tuple[str, ...] = (), store=None, scorer_for=None, skip=None) -> list[dict]:
    """Evaluate dense and then each variant `pick(n_layers)` gives (policy, label, config) on every
    --data, writing OUT/sweep.json and sweep.csv after each row (with the QuickSilverConfig
    fields `csv_fields` as extra columns), then the plots; returns the rows. args: --model, --data,
    --out, --protocol, --max-length, --stride, --max-eval-tokens and (optional) --heatmap, already checked
    (`check_args`). store: the calibrated AMQ store variants with AMQ quantize with (None: naive);
    each row's `weights` names the store that ran. scorer_for(model, qs, store): the scorer of a
    variant (default a new QuickSilverScorer). skip(policy, qs, rows): why a variant is not run,
    given the rows of its data set so far (dense first), or None to run it; the skipped variants
    and their reasons are listed in sweep.json's `skipped`."""
    from qsjax.runtime.compilecache import enable_compilation_cache
    from qsjax.evaluation.data import read_text, tokenize
    from qsjax.checkpoints.load import load_model_checked, load_tokenizer_checked, read_config
    from qsjax.evaluation.perplexity import Scorer, evaluate
    from qsjax.quicksilver.amqstore import weights_report
    from qsjax.quicksilver.scorer import QuickSilverScorer, evaluate_quicksilver
    from qsjax.weights import resolve_model

    out = Path(args.out)
    model_dir = resolve_model(args.model)
    cfg = read_config(args.model, model_dir)
    if args.max_length > cfg.max_positions:
        raise UsageError(f"--max-length {args.max_length} is longer than the model's context ({cfg.max_positions})")
    todo = pick(cfg.n_layers)
    heatmap_of = getattr(args, "heatmap", None) or "fast"
    enable_compilation_cache()
    model, tokenizer = load_model_checked(args.model, model_dir, "float32"), load_tokenizer_checked(args.model, model_dir)
    out.mkdir(exist_ok=True)
    rows, decisions, skipped = [], {}, []
    scorer_for = scorer_for or QuickSilverScorer

    def save():
        report = {"args": vars(args), "rows": rows} | ({"skipped": skipped} if skip is not None else {})
        write_output("--out", str(out / "sweep.json"), json.dumps(report, indent=1))
        write_output("--out", str(out / "sweep.csv"), csv_text(rows, csv_fields))

    for data in args.data:
        stream = tokenize(tokenizer, read_text(resolve_data(data)), args.max_eval_tokens)
        if len(stream) < 2:
            raise UsageError(f"--data {data}: fewer than 2 tokens to score")
        windows = windows_of(args, len(stream))
        with exit_on_interrupt():
            dense = evaluate(Scorer(model), stream, windows, progress=False)
        rows.append(dict(data=data, policy="dense", label="dense", perplexity=dense.perplexity, ppl_increase=0.0,
                         flops_reduction=0.0, flops_reduction_vs_full_lm_head=None, seconds=dense.seconds, speedup=1.0,
                         settings={}))
        print(f"{data}: dense ppl {dense.perplexity:.3f} ({dense.seconds:.0f} s)", file=sys.stderr)
        first = len(rows) - 1
        for i, (policy, label, qs) in enumerate(todo):
            reason = skip(policy, qs, rows[first:]) if skip is not None else None
            if reason:
                skipped.append(dict(data=data, policy=policy, label=label, reason=reason))
                save()
                continue
            t0 = time.perf_counter()
            keep = 1 if heatmap_of in (policy, label) else 0
            scorer = scorer_for(model, qs, store)
            with exit_on_interrupt():  # a compiled call Ctrl-C cannot otherwise interrupt; the files are written outside
                result, stats, dec = evaluate_quicksilver(scorer, stream, windows, progress=False,
                                                          keep_decisions=keep + len(windows) - 1 if keep else 0)
            if dec:
                decisions[data] = dec[-1]
            rows.append(dict(data=data, policy=policy, label=label, perplexity=result.perplexity,
                             ppl_increase=result.perplexity - dense.perplexity,
                             flops_reduction=stats["executed_flops_reduction"],
                             flops_reduction_vs_full_lm_head=stats["executed_flops_reduction_vs_full_lm_head"],
                             seconds=result.seconds, speedup=dense.seconds / result.seconds,
                             settings={"quicksilver": dataclasses.asdict(qs)}, stats=stats,  # as qsjax's reports
                             weights=weights_report(scorer.model)))
            print(f"{data} [{i + 1}/{len(todo)}]: {policy:34} {label:14} ppl {result.perplexity:9.3f} "
                  f"({result.perplexity - dense.perplexity:+.3f}) flops {-100 * stats['executed_flops_reduction']:+.1f}%  "
                  f"{dense.seconds / result.seconds:.2f}x  halted {stats['tokens_halted']}  "
                  f"[{time.perf_counter() - t0:.0f} s]", file=sys.stderr)
            save()
    try:
        for data in args.data:
            plot_frontiers(rows, data, out)
            if data in decisions:
                write_output("--out", str(out / f"heatmap_{Path(data).stem}.png"), heatmap(decisions[data], tokenizer, model.cfg.n_layers))
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[plot]')", file=sys.stderr)
    print(f"wrote {out}/sweep.json, sweep.csv and plots", file=sys.stderr)
    return rows


def csv_text(rows: list[dict], fields: tuple[str, ...] = ()) -> str:
    """One line per row; `fields`: QuickSilverConfig fields added as columns (empty for dense), and
    then the tokens halted."""
    f = io.StringIO()
    w = csv.writer(f)
    extra = [*fields, "tokens_halted"] if fields else []
    w.writerow(["data", "policy", "label", "perplexity", "ppl_increase", "flops_reduction",
                "flops_reduction_vs_full_lm_head", "seconds", "speedup", *extra])
    for r in rows:
        full = r["flops_reduction_vs_full_lm_head"]
        qs = r["settings"].get("quicksilver", {})
        w.writerow([r["data"], r["policy"], r["label"], f"{r['perplexity']:.4f}", f"{r['ppl_increase']:.4f}",
                    f"{r['flops_reduction']:.4f}", "" if full is None else f"{full:.4f}", f"{r['seconds']:.1f}",
                    f"{r['speedup']:.3f}", *([qs.get(k, "") for k in fields] +
                                             [r.get("stats", {}).get("tokens_halted", "")] if fields else [])])
    return f.getvalue()


if __name__ == "__main__":
    run_cli(main)
