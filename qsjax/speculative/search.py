"""Which sublayers a self-drafting model skips: a greedy search on shipped text, stored beside the model.

Draft & Verify's question (Zhang et al. 2024), answered training-free with a cheap proxy; the chosen
set is stored beside the model (`store.py`) for `python -m qsjax.generate --self-speculation`.

    python -m qsjax.speculative.search [--model M] [--tokens N] [--max-skipped 0.5] [--skipped 0.3]

The objective is the drafter's agreement with the full model, teacher-forced on the text x_1..x_N:

    agree_t(S) = [ argmax f_S(x_t | full cache of x_<t) == argmax f(x_t | x_<t) ]

with f_S the model without the sublayers in S, its query at t attending to the full model's keys and
values of x_<t and to its own at t: exactly what a one-token draft meets in the decode loop
(`drafting.self_drafts` writes its own entry through the cache the verify passes filled), so the mean
of agree_t is the greedy acceptance of one draft. For K drafts, the estimate

    accepted_K(S) = mean_t min(K, run_t),     run_t = the number of consecutive agree_t, agree_(t+1), ...

(over t with K positions after it) treats later drafts as if their context were the text's: an
estimate of the accepted drafts per verify pass; the decode loop's tally measures the real one.

The search, greedy on the weights it saves: from S = {}, add the sublayer c whose removal loses the
least agreement per share of the layers' weights it holds (`drafting.share_run`'s rule),

    c = argmin_c (agreement(S) - agreement(S + c)) / weight(c)

until the skipped share reaches --max-skipped; every step is a point of the curve (skipped share,
agreement, accepted_K for K = 1..6). One pass per candidate, sharing work: the drafter's residual
stream under S is kept at every sublayer boundary, and candidate c's pass starts at c's input.

The text: the last --tokens tokens of the shipped C4 validation sample, cut into --rows rows (the
evaluations score text from the start of their data sets, not this end). On the default model (30
layers, 60 sublayers) the defaults take about 3 minutes on 2 shared CPU cores. What the sets reach in
decoding, and why the stored default is the 10% set: docs/results/speculative/.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qsjax.dense import blocks
from qsjax.dense.attention import attention
from qsjax.dense.model import Layout, Sublayers, scan_blocks
from qsjax.speculative.drafting import share_run

MAX_K = 6  # accepted_K is reported for K = 1..MAX_K


@dataclasses.dataclass(frozen=True)
class Point:
    """One step of the search: the skip set, the share of the layers' weights it skips, the mean
    one-draft agreement and accepted_K for K = 1..MAX_K."""

    skip: Sublayers
    skipped: float
    agreement: float
    accepted: tuple[float, ...]


def sublayer_set(mask) -> Sublayers:
    """A mask over the 2L sublayers (2(l-1): attention of layer l, 2(l-1)+1: its MLP) -> Sublayers."""
    mask = np.asarray(mask, bool)
    layers = lambda part: frozenset(int(l) + 1 for l in np.flatnonzero(part))
    return Sublayers(layers(mask[0::2]), layers(mask[1::2]))


def sublayer_mask(skip: Sublayers, n_layers: int) -> np.ndarray:
    """Sublayers -> a mask [2L] bool (the order of `sublayer_set`)."""
    mask = np.zeros(2 * n_layers, bool)
    mask[[2 * (l - 1) for l in skip.attention]] = True
    mask[[2 * (l - 1) + 1 for l in skip.mlp]] = True
    return mask


def skipped_share(skip: Sublayers, cfg) -> float:
    """The share of the layers' weights the set skips (1 - `share_run`)."""
    return 1.0 - share_run(skip, cfg)


def accepted_runs(agree, K: int) -> float:
    """agree [B, T] bool -> mean over t <= T - K of min(K, the run of agreement starting at t)."""
    agree = np.asarray(agree, bool)
    B, T = agree.shape
    if T < K:
        return float("nan")
    ok = np.stack([agree[:, j:T - K + 1 + j] for j in range(K)], axis=-1)  # [B, T - K + 1, K]
    return float(np.cumprod(ok, axis=-1).sum(-1).mean())


def point(skip: Sublayers, agree, cfg) -> Point:
    agree = np.asarray(agree, bool)
    return Point(skip, skipped_share(skip, cfg), float(agree.mean()),
                 tuple(accepted_runs(agree, K) for K in range(1, MAX_K + 1)))


def search_text(tokenizer, n_tokens: int, rows: int) -> np.ndarray:
    """The last n_tokens // rows * rows tokens of the shipped C4 validation sample (its last
    documents, tokenized whole) as rows [rows, n_tokens // rows] int32."""
    from qsjax.evaluation.data import read_text, resolve_data

    T = n_tokens // rows
    text = read_text(resolve_data("c4"))
    ids = np.asarray(tokenizer.encode(text[-max(20000, 16 * n_tokens):], add_special_tokens=False), np.int32)
    return ids[len(ids) - rows * T:].reshape(rows, T)


def doubled(rule):
    """A layer's attention rule over doubled slots (`drafter_pass`): a sliding window of W slots
    becomes 2W - 1, so that query 2t sees key 2s + 1 iff s > t - W, and its own key 2t."""
    return rule if rule.sliding is None else dataclasses.replace(rule, sliding=2 * rule.sliding - 1)


def full_pass(model, tokens):
    """The full model over windows.  tokens [B, T] -> argmax [B, T] int32, the embedding x^0 [B, T, D],
    keys and values [L, B, T, K, Dh] each."""
    B, T = tokens.shape
    w = Layout.left_padded(model.cfg, jnp.zeros(B, jnp.int32), T)
    x0 = blocks.embed(model, tokens, w.positions)
    x, (k, v) = scan_blocks(model, x0, w)
    return jnp.argmax(blocks.lm_logits(model, x), -1).astype(jnp.int32), x0, k, v


def drafter_pass(model, x, first, skip, k_full, v_full):
    """The drafter without the sublayers in `skip` [2L] bool (traced), teacher-forced: the query at
    position t attends to the full model's keys and values of positions < t and to its own at t.
    x [B, T, D] is the residual stream at the input of sublayer `first` (traced; sublayers before it
    are taken as done) -> argmax [B, T] int32, the stream at every sublayer boundary [2L + 1, B, T, D]
    (entry i: the input of sublayer i; those before `first` are x).

    Slots are doubled so that the one attention function applies its causal rule: query t at slot
    2t, the full model's key s at 2s + 1 (seen iff s < t), the drafter's own key t at 2t, marked not
    ok but visible to its own query alone (`self_visible`)."""
    B, T, _ = x.shape
    w = Layout.left_padded(model.cfg, jnp.zeros(B, jnp.int32), T)
    q_slot = 2 * w.slots
    k_slot = jnp.concatenate([2 * w.slots + 1, 2 * w.slots], axis=1)  # [B, 2T]
    k_ok = jnp.concatenate([jnp.ones((B, T), bool), jnp.zeros((B, T), bool)], axis=1)
    stream = [x]

    def attn(x, l, blk):
        q, k, v = blocks.qkv(blk, x, w.cos, w.sin)
        o = attention(q, jnp.concatenate([k_full[l], k], 1), jnp.concatenate([v_full[l], v], 1), q_slot, k_slot, k_ok,
                      self_visible=True, rule=doubled(blocks.rule(blk)))
        return blocks.attn_residual(blk, x, o)

    for l, blk in enumerate(model.blocks):
        i = 2 * l
        x = jax.lax.cond((i >= first) & ~skip[i], functools.partial(attn, l=l, blk=blk), lambda x: x, x)
        stream.append(x)
        x = jax.lax.cond((i + 1 >= first) & ~skip[i + 1], functools.partial(blocks.mlp_residual, blk), lambda x: x, x)
        stream.append(x)
    return jnp.argmax(blocks.lm_logits(model, x), -1).astype(jnp.int32), jnp.stack(stream)


class Agreement:
    """The compiled passes over one batch of text: agreement(skip, stream, first) for any skip set."""

    def __init__(self, model, tokens):
        self.model = model
        tokens = jnp.asarray(tokens, jnp.int32)
        full = jax.jit(lambda state, t: full_pass(model.module(state), t))
        self.target, self.x0, self.k, self.v = full(model.state, tokens)
        self._draft = jax.jit(lambda state, x, first, skip, k, v: drafter_pass(model.module(state), x, first, skip, k, v))

    def __call__(self, skip_mask, x=None, first: int = 0):
        """-> agree [B, T] bool (numpy), the drafter's stream [2L + 1, B, T, D] (on device)."""
        x = self.x0 if x is None else x
        argmax, stream = self._draft(self.model.state, x, jnp.int32(first), jnp.asarray(skip_mask), self.k, self.v)
        return np.asarray(argmax == self.target), stream


def search(model, tokens, max_skipped: float, candidates: int = 0, progress: bool = True) -> list[Point]:
    """The greedy search (module docstring) on tokens [B, T] -> its curve, from the empty set on.
    candidates > 0: after the first step, which tries every sublayer, a step tries only the
    `candidates` sublayers whose loss was lowest when last tried (a lazy greedy search: losses
    change little from one step to the next, and each step then costs a few passes, not 2L)."""
    from tqdm import tqdm

    cfg, L = model.cfg, model.cfg.n_layers
    weight = np.asarray([skipped_share(sublayer_set(np.eye(2 * L, dtype=bool)[i]), cfg) for i in range(2 * L)])
    passes = Agreement(model, tokens)
    mask = np.zeros(2 * L, bool)
    agree, stream = passes(mask)
    curve = [point(Sublayers(), agree, cfg)]
    loss = np.zeros(2 * L)  # each sublayer's loss per weight when last tried
    bar = tqdm(total=round(100 * max_skipped), unit="%", disable=not progress, desc="searching",
               bar_format="{desc}: {n:.0f}/{total:.0f}% of the layers' weights skipped |{bar}| {elapsed}{postfix}")
    with bar:
        while curve[-1].skipped < max_skipped and not mask.all():
            left = np.flatnonzero(~mask)
            tried = left[np.argsort(loss[left], kind="stable")]
            if candidates and len(curve) > 1:
                tried = tried[:candidates]
            for n, c in enumerate(tried):
                bar.set_postfix_str(f"agreement {curve[-1].agreement:.3f}, pass {n + 1}/{len(tried)}", refresh=True)
                trial = mask.copy()
                trial[c] = True
                loss[c] = (curve[-1].agreement - passes(trial, stream[c], int(c))[0].mean()) / weight[c]
            mask[tried[int(np.argmin(loss[tried]))]] = True
            agree, stream = passes(mask)
            curve.append(point(sublayer_set(mask), agree, cfg))
            bar.update(min(100 * max_skipped, 100 * curve[-1].skipped) - bar.n)
    return curve


# ---------------------------------------------------------------------------------------------
# The command: search, then store the chosen set beside the model (`store.py`)

DEFAULT_SKIPPED = 0.1  # the stored set: the curve's first point skipping this share (docs/results/speculative/)


def parse_args(argv=None):
    from qsjax.runtime.cli import ArgumentParser

    p = ArgumentParser(prog="python -m qsjax.speculative.search", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Hugging Face model directory or a known model name (default: smollm2-135m-instruct)")
    p.add_argument("--tokens", type=int, default=128, metavar="N", help="tokens of text scored (default 128)")
    p.add_argument("--rows", type=int, default=2, metavar="R", help="rows the text is cut into, run as one batch (default 2)")
    p.add_argument("--max-skipped", type=float, default=0.5, metavar="X",
                   help="search until this share of the layers' weights is skipped (default 0.5)")
    p.add_argument("--skipped", type=float, default=DEFAULT_SKIPPED, metavar="X",
                   help=f"store the set that skips this share (the curve's first point at or above it; default {DEFAULT_SKIPPED})")
    p.add_argument("--candidates", type=int, default=6, metavar="M",
                   help="sublayers tried per step after the first, the best when last tried; 0: all (default 6)")
    p.add_argument("--output", metavar="FILE", help="where to write (default: self-draft.json in the model directory)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_args(args) -> None:
    from qsjax.runtime.cli import UsageError, check_output_file

    if args.rows < 1:
        raise UsageError(f"--rows must be >= 1, got {args.rows}")
    if args.tokens < 2 * args.rows:
        raise UsageError(f"--tokens must be at least 2 per row ({2 * args.rows}), got {args.tokens}")
    if args.candidates < 0:
        raise UsageError(f"--candidates must be >= 0, got {args.candidates}")
    if not 0 < args.max_skipped <= 1:
        raise UsageError(f"--max-skipped must be in (0, 1], got {args.max_skipped}")
    if not 0 < args.skipped <= args.max_skipped:
        raise UsageError(f"--skipped must be in (0, --max-skipped = {args.max_skipped}], got {args.skipped}")
    if args.output is not None:
        check_output_file("--output", args.output)


def main(argv=None) -> int:
    import json
    import sys

    from qsjax.checkpoints.load import load_model_checked, load_tokenizer_checked
    from qsjax.runtime.cli import check_not_inputs, check_output_file, exit_on_interrupt, model_inputs, write_output
    from qsjax.speculative.settings import format_sublayers
    from qsjax.speculative.store import store_json, store_path
    from qsjax.weights import resolve_model

    args = parse_args(argv)
    check_args(args)
    model_dir = resolve_model(args.model)
    output = args.output or str(store_path(model_dir))
    check_output_file("--output", output)
    check_not_inputs([("--output", output)], [i for i in model_inputs(model_dir) if i[1] != str(store_path(model_dir))])
    tokenizer = load_tokenizer_checked(args.model, model_dir)
    model = load_model_checked(args.model, model_dir, "float32")
    tokens = search_text(tokenizer, args.tokens, args.rows)
    with exit_on_interrupt():  # nothing is written before the search ends
        curve = search(model, tokens, args.max_skipped, args.candidates, progress=not args.quiet)
    chosen = next((p for p in curve if p.skipped >= args.skipped - 1e-9), curve[-1])  # 4 x 0.025 may be 0.0999...
    searched_on = {"text": "the last tokens of the shipped C4 validation sample (not scored by the evaluations)",
                   "tokens": int(tokens.size), "rows": args.rows, "max_skipped": args.max_skipped,
                   "candidates": args.candidates, "dtype": "float32"}
    write_output("--output", output, json.dumps(store_json(curve, chosen, model.cfg.n_layers, searched_on), indent=2) + "\n")
    print(f"stored {format_sublayers(chosen.skip)} ({100 * chosen.skipped:.0f}% of the layers' weights skipped, "
          f"one-draft agreement {chosen.agreement:.2f}) in {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from qsjax.runtime.cli import run_cli

    run_cli(main)
