"""Passkey answers up close: how near each greedy answer is to flipping, dense qsjax and settings.

    python scripts/passkey_margin.py --cells 4096:1.0 8192:1.0 --trials 3 --settings long local-512-r256 --json m.json

The prompts are `qsjax.passkey`'s grid (--lengths x --depths N, --trials keys per cell, --seed, the
filler haystack, 10 answer tokens, plain or --chat: the same keys as `python -m qsjax.passkey` and
bench_long's passkey section with the same grid), of which --cells picks some (LENGTH:DEPTH; default
all). The correct answer is " " and the key's digits (the tokenizer's ids for " 71432"). For each prompt and variant
(dense qsjax and each --settings, named in `long_settings.SETTINGS`), one prefill of the prompt, left
padded to the bucket `qsjax.generate` uses, then the answer teacher-forced through the decode steps:

    margin        = z_a1 - max_{t != a1} z_t      (z the prompt's last logits, a1 the answer's first token)
    first_logprob = log p(a1 | prompt)
    key_logprob   = sum_i log p(a_i | prompt, a_1..a_{i-1}),  i >= 2   (the digits, the format given)

margin > 0 iff the greedy answer starts as the key does; its size is how far the prompt is from
flipping (a cell whose dense margin is a few tenths of a nat is decided by any small change).
key_logprob is retrieval with the format given: a variant can lose the first token (answering
" the pass key.") and still hold the digits. Deterministic; JSON per prompt and per cell (means).
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from benchlib import check_json_path, check_positive, write_report
from long_settings import SETTINGS, config, recorded
from long_settings import check as check_settings
from qsjax.runtime.cli import ArgumentParser, UsageError, exit_on_interrupt, run_cli
from qsjax.evaluation.passkey_task import depth_fractions
from qsjax.passkey import parse_lengths

ANSWER_TOKENS = 10  # the answer room a passkey length counts (qsjax.passkey's default)


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/passkey_margin.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE (- for stdout)")
    p.add_argument("--settings", nargs="+", default=["long"], help=f"QuickSilver settings: {', '.join(SETTINGS)}")
    p.add_argument("--lengths", type=parse_lengths, default=[2048, 4096, 8192],
                   help="the grid's lengths (default 2048,4096,8192)")
    p.add_argument("--depths", type=int, default=5, help="the grid's depths from 0%% to 100%% (default 5)")
    p.add_argument("--trials", type=int, default=1, help="keys per cell (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the keys' seed (default 0)")
    p.add_argument("--cells", nargs="+", metavar="LENGTH:DEPTH", help="measure only these cells (e.g. 4096:1.0)")
    p.add_argument("--chat", action="store_true", help="the prompts in the model's chat template (qsjax.passkey --chat)")
    return p.parse_args(argv)


def check_args(args) -> None:
    check_positive(args, "depths", "trials")
    check_settings(args.settings, truncation=False)
    grid = {(n, d) for n in args.lengths for d in depth_fractions(args.depths)}
    args.picked = sorted(grid) if args.cells is None else [parse_cell(c, grid) for c in args.cells]
    check_json_path(args.json)


def parse_cell(text: str, grid) -> tuple[int, float]:
    """"4096:1.0" -> (4096, 1.0), a cell of the grid, or UsageError."""
    try:
        length, depth = text.split(":")
        cell = (int(length), float(depth))
    except ValueError:
        raise UsageError(f"--cells {text}: give LENGTH:DEPTH, e.g. 4096:1.0") from None
    if cell not in grid:
        choices = ", ".join(f"{n}:{d:g}" for n, d in sorted(grid))
        raise UsageError(f"--cells {text}: not a cell of the grid ({choices})")
    return cell


def scorer(model, qs, cache_length: int):
    """A compiled (tokens [1, T], start [1], answer [A]) -> (last logits [V], answer log-probs [A]) for
    dense qsjax (qs None) or a QuickSilver setting: the prompt prefilled, the answer teacher-forced."""
    import jax
    import jax.numpy as jnp

    from qsjax.quicksilver.decoding.steps import prepare, quicksilver_decode, quicksilver_prefill
    from qsjax.dense.sampler import dense_decode, dense_prefill

    def qs_prefill(module, tokens, start, n):
        p = quicksilver_prefill(qs, module, tokens, start, n)
        return p.logits, p.state

    if qs is None:
        prefill_fn, decode_fn = (lambda *a: dense_prefill(*a)[:2]), dense_decode
    else:
        model, prefill_fn, decode_fn = prepare(model, qs), qs_prefill, functools.partial(quicksilver_decode, qs)

    def score(state, tokens, start, answer):
        module = model.module(state)
        logits, cache = prefill_fn(module, tokens, start, cache_length)

        def step(cache, token):
            out, cache, _ = decode_fn(module, cache, token[None])
            return cache, out[0]

        _, later = jax.lax.scan(step, cache, answer[:-1])
        every = jnp.concatenate([logits, later])  # [A, V]: the logits that predict each answer token
        logp = jax.nn.log_softmax(every.astype(jnp.float32), axis=-1)
        return logits[0], jnp.take_along_axis(logp, answer[:, None], axis=-1)[:, 0]

    compiled = jax.jit(score)
    return lambda tokens, start, answer: compiled(model.state, tokens, start, answer)


def measure(score, prompt: list[int], answer: list[int], bucket: int) -> dict:
    """One prompt under one variant: margin, the first token picked, first_logprob and key_logprob."""
    import jax.numpy as jnp

    tokens = np.zeros((1, bucket), np.int32)  # the padding's ids are never seen (its slots are masked)
    tokens[0, bucket - len(prompt):] = prompt
    z, logp = score(jnp.asarray(tokens), jnp.asarray([bucket - len(prompt)], jnp.int32), jnp.asarray(answer, jnp.int32))
    z, logp = np.asarray(z, np.float64), np.asarray(logp, np.float64)
    return dict(margin=float(z[answer[0]] - np.delete(z, answer[0]).max()), top=int(z.argmax()),
                first_logprob=float(logp[0]), key_logprob=float(logp[1:].sum()))


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    from tqdm import tqdm

    from qsjax.runtime.buckets import cache_slots, prompt_bucket
    from qsjax.runtime.compilecache import enable_compilation_cache
    from qsjax.checkpoints.load import load_model_checked, load_tokenizer_checked, read_config
    from qsjax.evaluation.passkey_task import FILLER, make_cells
    from qsjax.weights import resolve_model

    model_dir = resolve_model(None)
    context = read_config(None, model_dir).max_positions
    if max(args.lengths) > context:
        raise UsageError(f"--lengths {max(args.lengths)} is longer than the model's context ({context} tokens)")
    tokenizer = load_tokenizer_checked(None, model_dir)
    cells = make_cells(tokenizer, FILLER + " ", args.lengths, depth_fractions(args.depths), args.trials, args.seed,
                       ANSWER_TOKENS, args.chat)
    cells = [c for c in cells if (c["length"], c["depth"]) in args.picked]
    enable_compilation_cache()
    model = load_model_checked(None, model_dir, "float32")
    L = model.cfg.n_layers
    variants = {"qsjax": None, **{name: config(name, L) for name in args.settings}}
    report = dict(command=" ".join(["python", "scripts/passkey_margin.py", *(sys.argv[1:] if argv is None else argv)]),
                  args={k: v for k, v in vars(args).items() if k != "picked"}, model=model_dir.name,
                  settings={name: recorded(name, L) for name in args.settings}, cells=[])
    bar = tqdm(total=sum(len(c["prompts"]) for c in cells) * len(variants), desc="prompt x variant", file=sys.stderr)
    scorers = {}  # (variant, prompt bucket) -> its compiled scorer, shared by the cells of one length
    # from here to the report nothing is written: Ctrl-C ends the run at once, even inside XLA
    with exit_on_interrupt(lambda signum: sys.stderr.write("\n")), bar:
        for cell in cells:
            bucket = prompt_bucket(max(map(len, cell["prompts"])), context)
            for name, qs in variants.items():
                if (name, bucket) not in scorers:
                    scorers[name, bucket] = scorer(model, qs, cache_slots(bucket, ANSWER_TOKENS))
            scores = {name: scorers[name, bucket] for name in variants}
            report["cells"].append(score_cell(cell, scores, bucket, tokenizer, bar))
    return write_report(args.json, report, format_table(report, list(variants)))


def score_cell(cell: dict, scores: dict, bucket: int, tokenizer, bar) -> dict:
    """Every prompt of a grid cell (padded to `bucket`) under every variant (name -> its `scorer`)."""
    trials = []
    for key, prompt in zip(cell["keys"], cell["prompts"]):
        answer = tokenizer.encode(f" {key}", add_special_tokens=False)
        row = {}
        for name, score in scores.items():
            row[name] = measure(score, prompt, answer, bucket)
            row[name]["top"] = tokenizer.decode([row[name]["top"]])
            bar.update()
        trials.append(dict(key=key, **row))
        bar.write(f"{cell['length']}@{cell['depth']:.0%} key {key}: " +
                  "  ".join(f"{n} {r['margin']:+.3f} ({r['top']!r})" for n, r in row.items()), file=sys.stderr)
    means = {name: {m: float(np.mean([t[name][m] for t in trials])) for m in ("margin", "key_logprob")}
             for name in scores}
    return dict(length=cell["length"], depth=cell["depth"], mean=means, trials=trials)


def format_table(report: dict, names: list[str]) -> str:
    lines = [f"{'cell':>12} {'key':>6} " + " ".join(f"{n:>22}" for n in names),
             f"{'':>12} {'':>6} " + " ".join(f"{'margin / key logp':>22}" for _ in names)]
    for cell in report["cells"]:
        where = f"{cell['length']}@{cell['depth']:.0%}"
        for t in cell["trials"]:
            lines.append(f"{where:>12} {t['key']:>6} " +
                         " ".join(f"{t[n]['margin']:+10.3f} / {t[n]['key_logprob']:9.3f}" for n in names))
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
