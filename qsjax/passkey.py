"""Passkey retrieval (needle in a haystack): `python -m qsjax.passkey`.

    python -m qsjax.passkey --lengths 1024,2048,4096,8192 --depths 5 --trials 5 --plot nih.png
    python -m qsjax.passkey --lengths 2048 --haystack wikitext103 --compare --quicksilver fast --json pk.json

A prompt hides a needle, "The pass key is 71432. Remember it. 71432 is the pass key.", in a haystack
(the filler "The grass is green. ..." repeated, or the text of `--haystack FILE` — a .txt, .jsonl or
.jsonl.gz file or a data set name, repeated if too short) and ends "What is the pass key? The pass
key is"; the model answers greedily.  Prompt layout, in tokens:
[BOS if the tokenizer adds one] instruction, haystack[:b], needle, haystack[b:], question.

- Length L: the whole sequence the model holds, prompt and answer. The prompt is exactly
  L - --max-new-tokens tokens (the haystack fills what the rest leaves), so L may be the model's
  context itself; every L is checked against the context before the weights load.
- Depth d: the needle goes at the sentence boundary b of the haystack nearest to d x its length
  (a boundary: the haystack's start or end, or after a sentence's last token; ties go to the earlier
  one). `--depths N` gives N depths evenly spaced from 0% to 100%; `--depths 1` gives 50%. The JSON
  gives each prompt's actual depth b / len(haystack).
- Keys: 5-digit numbers from numpy.random.default_rng(--seed), one per (length, depth, trial), drawn
  in that order; `--compare` runs the same prompts dense and under the QuickSilver options given.
- Answer rule: the continuation (EOS and what follows removed, special tokens dropped) is correct
  when its first run of decimal digits is exactly the key ("71432." and "is 71432" count; "714320",
  "7143" and "7 1 4 3 2" do not).
- `--chat` wraps instruction, haystack and question in the model's chat template as one user turn
  and starts the assistant's reply with "The pass key is". Off by default: the plain prompt is
  the literature's (Landmark Attention, LongLoRA) and works with models that have no template.

stdout: a table of correct/trials per length x depth (side by side with `--compare`) and the
overall accuracy; stderr: a progress bar per (length, depth) cell. `--json FILE` (keys `accuracy`,
`cells`, `settings`, `seconds`, `seconds_compile`; with `--compare` also `dense`, the same for the
dense run) and `--plot PNG` (the heatmap) are checked before anything loads and written
atomically after the table. Ctrl-C stops the run at once (status 130) and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


from qsjax.runtime.cli import (
    add_dtype_argument,
    ArgumentParser,
    UsageError,
    check_not_inputs,
    check_output_file,
    exit_on_interrupt,
    model_inputs,
    run_cli,
    write_results,
)
from qsjax.kvpolicy.eviction import add_eviction_args, eviction_from_args
from qsjax.evaluation.passkey_task import (
    ANSWER_RULE,
    FILLER,
    LENGTH_RULE,
    accuracy_matrix,
    depth_fractions,
    grid,
    make_cells,
    report_runs,
    run_cells,
)
from qsjax.evaluation.plots import require as require_matplotlib
from qsjax.quicksilver.options import (add_quicksilver_args, check_quicksilver_args, quicksilver_from_args, recorded,
                                      wants_help_all)

def parse_lengths(text: str) -> list[int]:
    """"1024,2048" -> [1024, 2048] (sorted, duplicates dropped)."""
    try:
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts (e.g. 1024,2048), got {text!r}") \
            from None
    if min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return sorted(set(lengths))


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m qsjax.passkey", description=__doc__.splitlines()[0])
    g = p.add_argument_group("task")
    g.add_argument("--model",
                   help="a Hugging Face model directory or a known model name (default: smollm2-135m-instruct)")
    g.add_argument("--lengths", type=parse_lengths, default=[1024, 2048, 4096, 8192],
                   help="comma-separated sequence lengths in tokens, prompt + answer (default 1024,2048,4096,8192)")
    g.add_argument("--depths", type=int, default=5, help="N needle depths evenly spaced from 0%% to 100%% (1: 50%%; "
                   "default 5)")
    g.add_argument("--trials", type=int, default=5, help="keys per (length, depth) cell, run in batches of --batch-size (default 5)")
    g.add_argument("--haystack", metavar="FILE", help="real text around the needle: a .txt, .jsonl or .jsonl.gz file, "
                   "or wikitext103 or c4 (default: a repeated filler text)")
    g.add_argument("--max-new-tokens", type=int, default=10, help="answer tokens (default 10)")
    g.add_argument("--seed", type=int, default=0, help="seed of the keys (default 0)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--compare", action="store_true", help="also run dense on the same prompts, side by side "
                   "(needs a QuickSilver option)")
    add_dtype_argument(g)
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE (- for stdout); its "
                   "settings.quicksilver replays with --quicksilver-config")
    o.add_argument("--plot", metavar="PNG", help="write the heatmap (length x depth, colour = accuracy) to PNG")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_quicksilver_args(p, wants_help_all(argv))
    add_eviction_args(p)
    g.add_argument("--batch-size", type=int, metavar="N", help="trials run together (default: as many of a cell's as "
                   "fit in memory)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Checks that need neither the model nor the haystack."""
    if args.depths < 1:
        raise UsageError(f"--depths must be >= 1, got {args.depths}")
    if args.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    check_quicksilver_args(args)
    enabled = quicksilver_from_args(args, None).enabled
    if eviction_from_args(args, enabled) is None and args.compare and not enabled:
        raise UsageError("--compare runs dense beside a QuickSilver or --kv-budget setting: give one (e.g. "
                         "--quicksilver fast)")
    if args.plot is not None:
        require_matplotlib("--plot")
        if args.plot == "-":
            raise UsageError("--plot needs a file name")
        check_output_file("--plot", args.plot)
    if args.json is not None:
        check_output_file("--json", args.json)
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")


def plan_batch(args, cfg) -> int:
    """Trials per batch from the memory estimate (every prompt held on the host, one batch on the
    device), before the prompts are built; UsageError when even one trial cannot fit."""
    from qsjax.runtime.memory import batch_size, estimate

    longest, cells = max(args.lengths), len(args.lengths) * args.depths
    need = estimate(cfg, args.dtype, longest - args.max_new_tokens, args.max_new_tokens, cells * args.trials)
    return batch_size(need, args.batch_size, args.trials, fix="lower --trials, --lengths or --max-new-tokens")


def format_table(report: dict) -> str:
    """correct/trials per length (rows) x depth (columns); with --compare dense | setting."""
    s = report["settings"]
    lengths, depths = s["lengths"], s["depths"]
    runs = report_runs(report)
    width = max(5, len(f"{s['trials']}/{s['trials']}"))
    header_cells = " ".join(f"{100 * d:.0f}%".rjust(width) for d in depths)
    block = len(header_cells)
    lines = ["  ".join([f"{'':>7}"] + [f"{name[:block]:<{block}}" for name, _ in runs]).rstrip(),
             "  ".join([f"{'length':>7}"] + [header_cells] * len(runs))]
    for length in lengths:
        row = [f"{length:>7}"]
        for _, run in runs:
            g = grid(run)
            row.append(" ".join(f"{g[length, d]['correct']}/{g[length, d]['trials_run']}".rjust(width) for d in depths))
        lines.append("  ".join(row))
    for name, run in runs:
        n = sum(c["trials_run"] for c in run["cells"])
        lines.append(f"{name}: accuracy {run['accuracy']:.3f} ({sum(c['correct'] for c in run['cells'])}/{n}), "
                     f"{run['seconds']:.1f} s (+ {run['seconds_compile']:.1f} s compiling)")
    return "\n".join(lines)


def settings(args, model_dir, haystack_path, cfg, qs, eviction) -> dict:
    qs_settings = recorded(args, qs)
    named = qs_settings["quicksilver_preset"]
    label = "dense" if qs is None else "quicksilver" + (f" {named}" if named else "")
    label = label if eviction is None else f"{eviction.policy} kv-budget {eviction.budget}"
    return dict(
        model=args.model or model_dir.name, model_dir=str(model_dir), context=cfg.max_positions, dtype=args.dtype,
        lengths=args.lengths, depths=depth_fractions(args.depths), trials=args.trials, seed=args.seed,
        max_new_tokens=args.max_new_tokens, chat=args.chat, haystack=args.haystack or "filler",
        haystack_path=None if haystack_path is None else str(haystack_path), length_rule=LENGTH_RULE,
        answer_rule=ANSWER_RULE, compare=args.compare, label=label,
        eviction=None if eviction is None else dataclasses.asdict(eviction),
    ) | qs_settings


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    haystack_path, text = None, FILLER + " "
    check_not_inputs(outputs(args), [("--quicksilver-config", args.quicksilver_config)])
    if args.haystack is not None:
        from qsjax.evaluation.data import read_text, resolve_data

        haystack_path = resolve_data(args.haystack)
        check_not_inputs(outputs(args), [("--haystack", haystack_path)])
        text = read_text(haystack_path) + "\n\n"

    from qsjax.runtime.compilecache import enable_compilation_cache
    from qsjax.checkpoints.load import check_vocabulary, load_model_checked, load_tokenizer_checked, model_label, read_config
    from qsjax.weights import resolve_model

    model_dir = resolve_model(args.model)
    check_not_inputs(outputs(args), model_inputs(model_dir))
    cfg = read_config(args.model, model_dir)
    too_long = [n for n in args.lengths if n > cfg.max_positions]
    if too_long:
        raise UsageError(f"--lengths {too_long[0]} is longer than the model's context ({cfg.max_positions} tokens)")
    qs = quicksilver_from_args(args, cfg.n_layers)
    qs = qs if qs.enabled else None
    eviction = eviction_from_args(args, qs is not None)
    size = plan_batch(args, cfg)
    tokenizer = load_tokenizer_checked(args.model, model_dir)
    try:
        cells = make_cells(tokenizer, text, args.lengths, depth_fractions(args.depths), args.trials, args.seed,
                           args.max_new_tokens, args.chat)
    except ValueError as e:  # no chat template
        raise UsageError(f"--chat: {model_label(args.model, model_dir)}: {e}") from None
    check_vocabulary([p for c in cells for p in c["prompts"]], cfg.vocab_size)
    enable_compilation_cache()
    from qsjax.runtime.generator import Generator

    report = dict(settings=settings(args, model_dir, haystack_path, cfg, qs, eviction))
    # from here to the report nothing is written: Ctrl-C ends the run at once, even inside XLA
    with exit_on_interrupt(lambda signum: sys.stderr.write("\n")):
        model = load_model_checked(args.model, model_dir, args.dtype)
        if args.compare:
            report["dense"] = run_cells(Generator(model, tokenizer), cells, args.max_new_tokens, not args.no_progress,
                                        "dense", size)
        report.update(run_cells(Generator(model, tokenizer, qs, eviction=eviction), cells, args.max_new_tokens,
                                not args.no_progress, report["settings"]["label"], size))
    return write_outputs(args, report)


def outputs(args) -> list[tuple[str, str | None]]:
    return [("--plot", args.plot), ("--json", args.json)]


def write_outputs(args, report: dict) -> int:
    """The table first (if a file cannot be written after all, the results are still shown), then
    the JSON and the plot, written even when stdout fails."""
    files = []
    if args.plot is not None:
        from qsjax.evaluation.plots import passkey_grids

        s = report["settings"]
        runs = [(name, run["accuracy"], accuracy_matrix(run, s["lengths"], s["depths"])) for name, run in report_runs(report)]
        files.append(("--plot", args.plot, passkey_grids(runs, s["lengths"], s["depths"])))
    if args.json is not None:
        files.append(("--json", args.json, json.dumps(report, indent=2) + "\n"))
    return write_results(format_table(report), files)


if __name__ == "__main__":
    run_cli(main)
