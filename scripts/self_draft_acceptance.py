"""Self-drafting on the real default model: what each skip set gets accepted, what its passes cost,
and decode speed against plain decoding, in one run.

    python scripts/self_draft_acceptance.py --json docs/results/speculative/self_draft.json

1. The search (`qsjax.speculative.search`) on --search-tokens tokens of the C4 sample's tail: the curve.
2. The sets of the curve at 10, 20, 30, 40, 50% of the layers' weights skipped, and early exits
   (--exits: every sublayer above layer E skipped), scored on the model's own greedy answers to
   open-ended chat prompts: the one-draft agreement at each generated position (exactly the greedy
   acceptance of one draft there) and accepted_K for K = 1..6 (the runs of agreement).
3. What a pass costs at batch 1 after the prompt, in plain steps: a verify pass of K + 1 tokens
   (c_K) and a draft step of each set (d), interleaved, so that the expected speed-up of (set, K),
   every step verifying, is (accepted_K + 1) / (K d + c_K).
4. Decode speed of the Generator, plain against self-drafting with the two (set, K) the estimate
   favours (the loop's own pace deciding when to verify), interleaved, medians of decode tokens/s;
   each output checked against plain greedy's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchlib import check_json_path, log, machine, median, ratio, rotated, write_report
from qsjax.runtime.cli import ArgumentParser, run_cli
from qsjax.speculative.drafting import weights_read

PROMPTS = ("Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "Explain to a curious teenager how the seasons work on Earth.",
           "Give me ten tips for someone who wants to start running.")
SHARES = (0.1, 0.2, 0.3, 0.4, 0.5)


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/self_draft_acceptance.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE (- for stdout)")
    p.add_argument("--store", metavar="FILE", help="take the curve from this self-draft.json (python -m "
                   "qsjax.speculative.search --output FILE) instead of searching")
    p.add_argument("--search-tokens", type=int, default=128, help="tokens the search scores (default 128)")
    p.add_argument("--candidates", type=int, default=6, help="the search's candidates per step (default 6)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="new tokens per prompt (default 96)")
    p.add_argument("--exits", type=int, nargs="+", default=[24, 20, 15], help="early exits scored (default 24 20 15)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    return p.parse_args(argv)


def own_text_scores(model, prompts, answers, sets: dict) -> dict:
    """name -> {agreement, accepted [K = 1..6]} of each set on the model's own answers (rows
    right-padded: padding comes after every scored position, which a causal pass never reads)."""
    from qsjax.speculative.search import MAX_K, Agreement, sublayer_mask

    rows = [p + a for p, a in zip(prompts, answers)]
    T = max(map(len, rows))
    tokens = np.zeros((len(rows), T), np.int32)
    for r, row in zip(tokens, rows):
        r[:len(row)] = row
    passes = Agreement(model, tokens)
    out = {}
    for name, skip in sets.items():
        agree, _ = passes(sublayer_mask(skip, model.cfg.n_layers))
        # position t predicts token t + 1: the answer's tokens after its first are predicted at len(p)..len(row)-2
        parts = [agree[i, len(p):len(row) - 1] for i, (p, row) in enumerate(zip(prompts, rows))]
        runs = {K: [] for K in range(1, MAX_K + 1)}
        for part in parts:
            for K in runs:
                for t in range(len(part) - K + 1):
                    runs[K].append(int(np.cumprod(part[t:t + K]).sum()))
        out[name] = {"agreement": float(np.concatenate(parts).mean()),
                     "accepted": [float(np.mean(runs[K])) for K in runs], "positions": int(sum(map(len, parts)))}
    return out


def pass_costs(model, prompt, sets: dict, repeats: int) -> dict:
    """Seconds of a full pass of T = 1..7 tokens, and of each set's one-token draft step, at batch 1
    through the cache a prompt left: every pass once per round, the order rotated, medians over
    repeats x 10 rounds (a shared machine's load drifts alike over all of them)."""
    import jax
    import jax.numpy as jnp

    from qsjax.dense.model import Sublayers, run_step

    _, cache = model.prefill(jnp.asarray([prompt], jnp.int32), jnp.zeros(1, jnp.int32), len(prompt) + 16)
    lead = jnp.zeros(1, jnp.int32)

    def compiled(T, skip):
        f = jax.jit(lambda state, cache, t: run_step(model.module(state), cache, t, lead, skip=skip)[0])
        tokens = jnp.ones((1, T), jnp.int32)
        jax.block_until_ready(f(model.state, cache, tokens))
        return lambda: jax.block_until_ready(f(model.state, cache, tokens))

    passes = {("full", T): compiled(T, Sublayers()) for T in range(1, 8)}
    passes.update({("draft", name): compiled(1, skip) for name, skip in sets.items()})
    times = {key: [] for key in passes}
    for r in range(repeats * 10):
        for key in rotated(passes, r):
            t0 = time.perf_counter()
            passes[key]()
            times[key].append(time.perf_counter() - t0)
    return {"full": {T: median(times[("full", T)]) for T in range(1, 8)},
            "draft": {name: median(times[("draft", name)]) for name in sets}}


def main(argv=None) -> int:
    args = parse_args(argv)
    check_json_path(args.json)
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.checkpoints.tokenizer import load_tokenizer
    from qsjax.dense.model import Sublayers
    from qsjax.runtime.generator import Generator
    from qsjax.speculative.search import Point, search, search_text, skipped_share
    from qsjax.speculative.settings import Speculation, format_sublayers, parse_sublayers
    from qsjax.weights import resolve_model

    model_dir = resolve_model(None)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    L = model.cfg.n_layers
    plain = Generator(model, tok)
    prompts = [tok.encode_prompt(p, chat=True) for p in PROMPTS]
    answers = [plain([p], max_new_tokens=args.max_new_tokens).token_ids[0] for p in prompts]
    log(f"answers: {[len(a) for a in answers]} tokens")

    t0 = time.perf_counter()
    if args.store:
        stored = json.loads(Path(args.store).read_text(encoding="utf-8"))
        curve = [Point(parse_sublayers(p["skip"]) if p["skip"] else Sublayers(), p["skipped"], p["agreement"],
                       tuple(p["accepted"])) for p in stored["curve"]]
        searched_on = {"store": args.store, **stored["searched_on"]}
    else:
        curve = search(model, search_text(tok, args.search_tokens, 2), max(SHARES) + 0.01, args.candidates)
        searched_on = {"tokens": args.search_tokens, "candidates": args.candidates}
    search_seconds = time.perf_counter() - t0
    sets = {}
    for share in SHARES:
        p = next((p for p in curve if p.skipped >= share - 0.01), curve[-1])
        sets[f"skip {round(100 * share)}%"] = p.skip
    for e in args.exits:
        above = frozenset(range(e + 1, L + 1))
        sets[f"exit {e}"] = Sublayers(above, above)
    log("scoring the sets on the model's own answers ...")
    scores = own_text_scores(model, prompts, answers, sets)
    log("timing passes ...")
    costs = pass_costs(model, prompts[0] + answers[0][:32], sets, args.repeats)
    step = costs["full"][1]
    estimates = {}
    for name, skip in sets.items():
        d = costs["draft"][name] / step
        estimates[name] = [(scores[name]["accepted"][K - 1] + 1) / (K * d + costs["full"][K + 1] / step) for K in range(1, 7)]
    ranked = sorted(((n, K) for n in sets if n.startswith("skip") for K in range(1, 7)),
                    key=lambda nk: -estimates[nk[0]][nk[1] - 1])[:2]
    log("best estimates: " + ", ".join(f"{n}, K = {K}: {estimates[n][K - 1]:.2f}x" for n, K in ranked))
    variants = {"plain": plain}
    for n, K in ranked:
        variants[f"{n}, K = {K}"] = Generator(model, tok, speculation=Speculation("layers", K, skip=sets[n]))
    speed = {name: [] for name in variants}
    tally = {}
    for name, gen in variants.items():  # compile and warm up
        for p in prompts:
            gen([p], max_new_tokens=args.max_new_tokens)
    for r in range(args.repeats):
        for name in rotated(variants, r):
            for i, p in enumerate(prompts):
                res = variants[name]([p], max_new_tokens=args.max_new_tokens)
                assert res.token_ids[0] == answers[i], f"{name}: output differs from plain greedy on prompt {i}"
                speed[name].append(res.decode_tokens_per_second)
                tally[(name, i)] = res.speculation
    medians = {name: median(v) for name, v in speed.items()}
    report = {
        "machine": machine(), "model": model_dir.name, "prompts": list(PROMPTS), "max_new_tokens": args.max_new_tokens,
        "search": {**searched_on, "seconds": search_seconds,
                   "curve": [{"skipped": p.skipped, "agreement": p.agreement, "accepted": list(p.accepted),
                              "skip": format_sublayers(p.skip)} for p in curve]},
        "sets": {name: {"skip": format_sublayers(skip), "skipped": skipped_share(skip, model.cfg), **scores[name],
                        "draft_step_cost": costs["draft"][name] / step, "weights_read": weights_read(skip, model.cfg),
                        "estimated_speedup": estimates[name]}
                 for name, skip in sets.items()},
        "verify_cost": {K: costs["full"][K + 1] / step for K in range(1, 7)}, "plain_step_seconds": step,
        "timed": {"decode_tokens_per_second": medians,
                  "speedup": {n: ratio(medians[n], medians["plain"]) for n in variants},
                  "speculation": {f"{n} / prompt {i}": t for (n, i), t in tally.items() if t is not None}},
    }
    lines = [f"{'set':<12} {'skipped':>7} {'agree':>6} " + " ".join(f"acc{K}" for K in range(1, 7)) + "  read  draft  best est."]
    for name in sets:
        s = report["sets"][name]
        lines.append(f"{name:<12} {s['skipped']:7.2f} {s['agreement']:6.3f} " + " ".join(f"{a:4.2f}" for a in s["accepted"])
                     + f"  {s['weights_read']:4.2f}  {s['draft_step_cost']:5.2f}  {max(s['estimated_speedup']):.2f}x")
    lines.append("verify cost c_K (plain steps): " + ", ".join(f"K={K}: {c:.2f}" for K, c in report["verify_cost"].items()))
    lines.append("decode tokens/s: " + ", ".join(f"{n} {v:.1f} ({medians[n] / medians['plain']:.2f}x)"
                                                 for n, v in medians.items()))
    return write_report(args.json, report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    run_cli(main)
