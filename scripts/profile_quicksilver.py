"""Where one window's time goes, dense qsjax against a QuickSilver preset, piece by piece.

    python scripts/profile_quicksilver.py --json profile_quicksilver.json
    python scripts/profile_quicksilver.py --quicksilver long --max-length 8192 --repeats 3 --json profile_long.json

One strided window of WikiText-103 test (the second: --max-length tokens, the last --stride scored)
on the real default model. Each piece is jitted alone on the real weights through the library's
public functions and timed (median of --repeats calls after a warm-up): the embedding
(`blocks.embed`), one plain block over the window (`model.block`), the preset's decision layer
(`quicksilver.layer.layer_step`, every token computing), one layer above it with the preset's own
decisions (only the tokens still computing run: bucketed compaction), and the LM head with the NLL on
the scored positions. The sums of the pieces are set against the whole windows timed the same way;
`bound` is the speed-up the preset would reach if the layers above its decision layer cost nothing.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from benchlib import check_json_path, check_positive, log, machine, timed, write_report
from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/profile_quicksilver.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE (- for stdout)")
    p.add_argument("--quicksilver", default="fast", choices=["paper", "fast", "long"],
                   help="preset (default fast; long with e.g. --max-length 8192)")
    p.add_argument("--max-length", type=int, default=2048, help="window length (default 2048)")
    p.add_argument("--stride", type=int, default=512, help="scored tokens at the window's end (default 512)")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per piece; medians (default 15)")
    return p.parse_args(argv)


def profile(model, qs, tokens: np.ndarray, offset: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from qsjax.dense import blocks
    from qsjax.dense.model import Layout, block
    from qsjax.evaluation.perplexity import Scorer, nll_of
    from qsjax.quicksilver.window.rows import compaction_buckets
    from qsjax.quicksilver.scorer import QuickSilverScorer
    from qsjax.quicksilver.window.step import layer_step
    from qsjax.quicksilver.window.state import Tokens
    from qsjax.quicksilver.window.forward import context, first_decision_layer

    cfg = model.cfg
    L, T = cfg.n_layers, tokens.shape[1]
    d = first_decision_layer(qs, L)
    lengths = np.array([T], np.int32)
    scorer = QuickSilverScorer(model, qs)
    halt = np.asarray(scorer.score(tokens, lengths, offset)[1].halt)  # [1, T]: layer after which each stopped
    positions = jnp.arange(T)[None]
    w = Layout.of(cfg, positions, jnp.ones((1, T), bool))
    ctx = context(qs, w, positions < offset, positions >= offset)

    def qs_step(layer, active):
        def f(m, x):
            start = Tokens.start(x, w.valid, L)
            tok = dataclasses.replace(start, active=active, halt=jnp.where(active, L, layer - 1).astype(jnp.int32))
            return layer_step(qs, m, m.blocks[layer - 1], layer, tok, ctx, compaction_buckets(T))[0].x
        return f

    pieces = {
        "embed": lambda m, t: blocks.embed(m, t, positions),
        "plain_block": lambda m, x: block(m.blocks[d - 1], x, w)[0],
        "decision_layer_step": qs_step(d, w.valid),
        "step_above_decision_layer": qs_step(d + 1, jnp.asarray(halt > d)),
        "lm_head_and_nll": lambda m, x, t: nll_of(blocks.lm_logits(m, x[:, offset:-1]), t[:, offset + 1:]),
    }
    x = jax.jit(lambda s, t: blocks.embed(model.module(s), t, positions))(model.state, tokens)
    operands = {"embed": (tokens,), "lm_head_and_nll": (x, tokens)}
    seconds = {}
    for name, fn in pieces.items():
        jitted = jax.jit(lambda state, *a, fn=fn: fn(model.module(state), *a))
        state = scorer.model.state if name.endswith("step") else model.state
        seconds[name] = timed(lambda: jitted(state, *operands.get(name, (x,))), repeats)
        log(f"[profile] {name}: {seconds[name] * 1e3:.1f} ms")
    dense = Scorer(model)
    seconds["window_dense_qsjax"] = timed(lambda: dense(tokens, offset), repeats)
    seconds["window_preset"] = timed(lambda: scorer.score(tokens, lengths, offset)[0], repeats)
    above = L - d
    model_dense = seconds["embed"] + L * seconds["plain_block"] + seconds["lm_head_and_nll"]
    below = seconds["embed"] + (d - 1) * seconds["plain_block"] + seconds["decision_layer_step"] + seconds["lm_head_and_nll"]
    model_preset = below + above * seconds["step_above_decision_layer"]
    return {
        "window_tokens": T, "scored_tokens": T - 1 - offset, "decision_layer": d, "layers_above": above,
        "tokens_computing_above": int((halt > d).sum()), "seconds": seconds,
        "sum_of_pieces": {"dense_qsjax": model_dense, "preset": model_preset},
        "share_of_dense_window": {"embed": seconds["embed"] / model_dense, "blocks": L * seconds["plain_block"] / model_dense,
                                  "lm_head_and_nll": seconds["lm_head_and_nll"] / model_dense},
        "step_above_vs_plain_block": seconds["step_above_decision_layer"] / seconds["plain_block"],
        "decision_step_vs_plain_block": seconds["decision_layer_step"] / seconds["plain_block"],
        "speedup_measured": seconds["window_dense_qsjax"] / seconds["window_preset"],
        "speedup_from_pieces": model_dense / model_preset,
        "bound": model_dense / below,
    }


def format_table(pr: dict) -> str:
    lines = [f"one {pr['window_tokens']}-token window ({pr['scored_tokens']} scored; decisions from layer "
             f"{pr['decision_layer']}, {pr['tokens_computing_above']} tokens computing in the {pr['layers_above']} layers above):"]
    lines += [f"  {name:28} {v * 1e3:9.1f} ms" for name, v in pr["seconds"].items()]
    lines.append(f"  speed-up measured {pr['speedup_measured']:.3f}x, from the pieces {pr['speedup_from_pieces']:.3f}x, "
                 f"bound (layers above free) {pr['bound']:.3f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_positive(args, "max_length", minimum=2)
    check_positive(args, "repeats")
    if not 0 < args.stride < args.max_length:
        raise UsageError(f"--stride must be in 1..--max-length - 1 ({args.max_length - 1}), got {args.stride}")
    check_json_path(args.json)
    from qsjax.evaluation.data import read_text, resolve_data, tokenize
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.quicksilver.settings import preset
    from qsjax.checkpoints.tokenizer import load_tokenizer
    from qsjax.weights import resolve_model

    model_dir = resolve_model(None)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    if args.max_length > model.cfg.max_positions:
        raise UsageError(f"--max-length {args.max_length} is longer than the model's context ({model.cfg.max_positions})")
    stream = tokenize(tokenizer, read_text(resolve_data("wikitext103")))
    tokens = np.asarray(stream[args.stride:args.stride + args.max_length], np.int32)[None]
    if tokens.shape[1] < args.max_length:
        raise UsageError(f"the profile needs {args.stride + args.max_length} tokens of WikiText-103 test")
    qs = preset(args.quicksilver, model.cfg.n_layers)
    report = {"command": " ".join(["python", "scripts/profile_quicksilver.py", *(sys.argv[1:] if argv is None else argv)]),
              "model": model_dir.name, "preset": args.quicksilver, "machine_at_start": machine(),
              **profile(model, qs, tokens, args.max_length - args.stride - 1, args.repeats)}
    return write_report(args.json, report, format_table(report))


if __name__ == "__main__":
    run_cli(main)
