"""Speculative decoding on the real default model: plain qsjax decoding, each drafter, and transformers'
`generate` (plain, `prompt_lookup_num_tokens`, `assistant_early_exit`) on the same prompts, in one run.

    python scripts/bench_speculative.py --json bench_speculative.json

Prompts (scripts/speculative_prompts.py): grounded (copy, extract from, summarise, quote a C4 passage),
open-ended (questions, story starts), and a long prompt of ~--long-tokens C4 tokens under
`--quicksilver long` (qsjax's variants; transformers runs it dense). transformers' assistant_early_exit
only with --hf-exit (minutes per prompt on a 2-core machine). Greedy, the model's end tokens,
batch 1, float32, --threads PyTorch threads. Each variant and prompt is run once untimed (compilation,
warm-up); then each repeat runs every prompt with every variant, the order rotated; medians.

Decode tokens/s: tokens after the first per second of decoding. qsjax: the Generator's
decode_tokens_per_second (the decode program's time). transformers: the same tokens over the median
time of `generate` less the median time of a one-token `generate` on the same prompt (its prefill and
first token). A group's figure is its tokens over its prompts' summed median decode seconds.
Identical: every prompt's greedy tokens equal the reference's (qsjax: plain qsjax's; transformers:
plain transformers'), token for token. Verify cost: one `run_step` of K + 1 tokens over a plain
step's time, after a grounded prompt.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from benchlib import (check_json_path, check_positive, fmt, load_hf, log, machine, median, ratio, rotated, timed,
                      torch_run, write_report)
from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli
from qsjax.speculative.settings import Speculation


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to generate: qsjax with `speculation` (None: plain) or transformers' generate with
    `hf_options` (keyword arguments, as pairs), compared with `reference` (same engine, plain)."""

    name: str
    engine: str  # "qsjax" or "transformers"
    speculation: Speculation | None = None
    hf_options: tuple = ()
    long: bool = False  # also run on the long prompt

    @property
    def reference(self) -> str:
        return "qsjax_plain" if self.engine == "qsjax" else "hf_plain"


def parse_pair(text: str):
    k, _, n = text.partition(":")
    if not (k.isdigit() and n.isdigit() and int(k) >= 1 and int(n) >= 1):
        raise UsageError(f"--lookup {text}: give K:N (drafts per step, n-gram size), both at least 1")
    return int(k), int(n)


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/bench_speculative.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE (- for stdout)")
    p.add_argument("--lookup", nargs="+", default=["4:2", "10:2", "10:3"], metavar="K:N",
                   help="qsjax prompt lookup settings (default 4:2 10:2 10:3)")
    p.add_argument("--hf-lookup", type=int, default=10, metavar="K",
                   help="transformers' prompt_lookup_num_tokens (n-gram 2, its default), compared with qsjax's K:2 "
                   "(default 10)")
    p.add_argument("--exit-layer", type=int, default=20, help="early exit drafter: the first E layers (default 20)")
    p.add_argument("--exit-tokens", type=int, default=4, help="early exit drafter: drafts per step (default 4)")
    p.add_argument("--prompts", type=int, default=2, help="grounded and open-ended prompts each (1..4, default 2)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens at most (end token ends; default 64)")
    p.add_argument("--long-tokens", type=int, default=2000, help="C4 tokens of the long prompt (default 2000)")
    p.add_argument("--long-new-tokens", type=int, default=32, help="new tokens after the long prompt (default 32)")
    p.add_argument("--skip-long", action="store_true", help="leave out the long prompt")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats; medians are reported (default 2)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (default 2)")
    p.add_argument("--skip-hf", action="store_true", help="leave out transformers")
    p.add_argument("--hf-exit", action="store_true",
                   help="also transformers' assistant_early_exit (slow: minutes per prompt on a 2-core machine)")
    p.add_argument("--quick", action="store_true",
                   help="a CI-sized check: one prompt per group, 24 new tokens, a 600-token long prompt, "
                   "lookup 10:2, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.long_tokens, args.long_new_tokens = 1, 24, 600, 16
        args.lookup, args.repeats = ["10:2"], 1
    return args


def check_args(args) -> None:
    check_positive(args, "hf_lookup", "exit_layer", "exit_tokens", "prompts", "long_tokens", "repeats", "threads")
    check_positive(args, "new_tokens", "long_new_tokens", minimum=2)
    if args.prompts > 4:
        raise UsageError(f"--prompts must be at most 4, got {args.prompts}")
    args.lookup = [parse_pair(t) for t in args.lookup]
    check_json_path(args.json)


def variants(args, n_layers: int) -> list[Variant]:
    """The variants of a run; add a drafter here (e.g. self-drafting with a searched skip set:
    Variant("qsjax_layers", "qsjax", Speculation("layers", K, skip=...)))."""
    if args.exit_layer >= n_layers:
        raise UsageError(f"--exit-layer must be below the model's {n_layers} layers, got {args.exit_layer}")
    main = (args.hf_lookup, 2)
    out = [Variant("qsjax_plain", "qsjax", long=True)]
    for k, n in dict.fromkeys([*args.lookup, main]):
        out.append(Variant(f"qsjax_lookup_k{k}_n{n}", "qsjax", Speculation("lookup", k, n), long=(k, n) == main))
    out.append(Variant(f"qsjax_exit_e{args.exit_layer}_k{args.exit_tokens}", "qsjax",
                       Speculation("exit", args.exit_tokens, exit_layer=args.exit_layer)))
    if not args.skip_hf:
        out += [Variant("hf_plain", "transformers", long=True),
                Variant(f"hf_lookup_k{args.hf_lookup}", "transformers",
                        hf_options=(("prompt_lookup_num_tokens", args.hf_lookup),), long=True)]
        if args.hf_exit:
            out.append(Variant(f"hf_exit_e{args.exit_layer}_k{args.exit_tokens}", "transformers",
                               hf_options=(("assistant_early_exit", args.exit_layer),
                                           ("num_assistant_tokens", args.exit_tokens))))
    return out


@dataclasses.dataclass
class Call:
    """One call's measurements: first token and decode seconds, the new tokens, qsjax's speculation
    report (None: plain or transformers), transformers' full-model passes after the prefill."""

    first: float
    decode: float
    tokens: list[int]
    speculation: dict | None = None
    passes: int | None = None


class Runner:
    """Runs a variant on a prompt: qsjax through a Generator per (variant, QuickSilver), transformers
    through `generate` with its full-model passes counted (a hook on the last decoder layer)."""

    def __init__(self, model, tokenizer, hf, quicksilver):
        self.model, self.tokenizer, self.hf, self.quicksilver = model, tokenizer, hf, quicksilver
        self.gens = {}
        self.eos = sorted(set(model.cfg.eos_ids) | set(tokenizer.eos_ids))  # the Generator's end tokens
        self.passes = 0
        if hf is not None:
            hf.model.layers[-1].register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.passes += 1

    def generator(self, v: Variant, long: bool):
        from qsjax.runtime.generator import Generator

        key = (v.name, long)
        if key not in self.gens:
            self.gens[key] = Generator(self.model, self.tokenizer, self.quicksilver if long else None,
                                       speculation=v.speculation)
        return self.gens[key]

    def hf_generate(self, ids, n: int, options=()):
        import torch

        x = torch.tensor([ids], device=self.hf.device)
        eos = self.eos
        self.passes = 0
        t0 = time.perf_counter()
        out = torch_run(lambda: self.hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                                 do_sample=False, eos_token_id=eos, pad_token_id=eos[0],
                                                 **dict(options)))
        seconds, new = time.perf_counter() - t0, out[0, len(ids):].tolist()
        return seconds, new[: next((i for i, t in enumerate(new) if t in eos), len(new))]

    def __call__(self, v: Variant, ids, n: int, long: bool) -> Call:
        if v.engine == "qsjax":
            r = self.generator(v, long)([ids], max_new_tokens=n)
            return Call(r.seconds_first_token, r.seconds_decode, r.token_ids[0], r.speculation)
        seconds, tokens = self.hf_generate(ids, n, v.hf_options)
        return Call(0.0, seconds, tokens, passes=self.passes - 1)  # first: from the one-token calls

    def hf_first(self, ids) -> float:
        return self.hf_generate(ids, 1)[0]


def measure(runner: Runner, vs: list[Variant], groups, repeats: int) -> dict:
    """-> {(group, prompt, variant): [Call, ...]} (the timed repeats; "hf_first": one-token calls)."""
    cases = [(g, p, [v for v in vs if v.long or not g.quicksilver]) for g in groups for p in g.prompts]
    calls = {}
    for g, p, run in cases:
        for v in run:
            t0 = time.perf_counter()
            runner(v, p.ids, g.new_tokens, g.quicksilver)
            log(f"[speculative] {g.name}/{p.name} {v.name}: warm-up {time.perf_counter() - t0:.1f} s")
        if runner.hf is not None:
            runner.hf_first(p.ids)
    for r in range(repeats):
        for g, p, run in cases:
            for v in rotated(run + ([None] if runner.hf is not None else []), r):
                key = (g.name, p.name, "hf_first" if v is None else v.name)
                call = Call(runner.hf_first(p.ids), 0.0, []) if v is None else runner(v, p.ids, g.new_tokens,
                                                                                      g.quicksilver)
                calls.setdefault(key, []).append(call)
        log(f"[speculative] repeat {r + 1}/{repeats} done")
    return calls


def prompt_cell(calls: list[Call], firsts: list[Call] | None, reference: list[int]) -> dict:
    """One variant on one prompt: medians over the repeats (transformers' first token: the one-token calls)."""
    tokens, spec = calls[-1].tokens, calls[-1].speculation
    first = median([c.first for c in (firsts or calls)])
    decode = median([c.decode for c in calls]) - (first if firsts is not None else 0.0)
    n = max(0, len(tokens) - 1)
    return {"new_tokens": len(tokens), "first_token_seconds": first, "decode_seconds": decode,
            "decode_tokens_per_second": n / decode if n and decode > 0 else None,
            "decode_seconds_all": [c.decode for c in calls], "same_tokens_every_repeat": all(c.tokens == tokens for c in calls),
            "identical_to_reference": tokens == reference, "speculation": spec,
            "full_passes_after_prefill": calls[-1].passes, "tokens": tokens}


def group_cell(cells: list[dict]) -> dict:
    """A variant over a group's prompts: decode tokens over summed decode seconds, mean first token,
    acceptance and tokens per step over every verify pass (transformers: decode tokens per full pass)."""
    n = sum(max(0, c["new_tokens"] - 1) for c in cells)
    seconds = sum(c["decode_seconds"] for c in cells)
    specs = [c["speculation"] for c in cells if c["speculation"] is not None]
    drafted, accepted = sum(s["drafted"] for s in specs), sum(s["accepted"] for s in specs)
    passes = [c["full_passes_after_prefill"] for c in cells if c["full_passes_after_prefill"] is not None]
    per_step = (sum(s["tokens"] for s in specs) / max(1, sum(s["row_steps"] for s in specs)) if specs else
                n / sum(passes) if passes and sum(passes) else 1.0)
    return {"decode_tokens_per_second": n / seconds if n and seconds > 0 else None,
            "first_token_seconds": sum(c["first_token_seconds"] for c in cells) / len(cells),
            "acceptance_rate": accepted / drafted if drafted else None, "drafted": drafted if specs else None,
            "verify_steps": sum(s["verify_steps"] for s in specs) if specs else None,
            "mean_tokens_per_step": per_step, "identical": all(c["identical_to_reference"] for c in cells)}


def summarise(calls: dict, vs: list[Variant], groups, hf_lookup: int) -> dict:
    """Per group: each variant's prompts and figures, ratios to its reference (and qsjax's lookup at
    transformers' K and n-gram 2 to transformers' lookup, plain qsjax to plain transformers)."""
    out = {}
    for g in groups:
        run = [v for v in vs if v.long or not g.quicksilver]
        prompts = {v.name: {} for v in run}
        for p in g.prompts:
            firsts = calls.get((g.name, p.name, "hf_first"))
            for v in run:
                ref = calls[(g.name, p.name, v.reference)][-1].tokens
                prompts[v.name][p.name] = prompt_cell(calls[(g.name, p.name, v.name)],
                                                      firsts if v.engine == "transformers" else None, ref)
        figures = {name: {**group_cell(list(cells.values())), "prompts": cells} for name, cells in prompts.items()}
        for v in run:
            f = figures[v.name]
            f["vs_reference"] = ratio(f["decode_tokens_per_second"], figures[v.reference]["decode_tokens_per_second"])
        pairs = {"qsjax_plain_vs_hf_plain": ("qsjax_plain", "hf_plain"),
                 "qsjax_lookup_vs_hf_lookup": (f"qsjax_lookup_k{hf_lookup}_n2", f"hf_lookup_k{hf_lookup}")}
        cross = {k: ratio(figures[a]["decode_tokens_per_second"], figures[b]["decode_tokens_per_second"])
                 for k, (a, b) in pairs.items() if a in figures and b in figures}
        out[g.name] = {"new_tokens": g.new_tokens, "quicksilver": "long" if g.quicksilver else None,
                       "prompt_tokens": {p.name: len(p.ids) for p in g.prompts}, "variants": figures,
                       "cross_engine": cross}
    return out


def targets(groups: dict, hf_lookup: int) -> dict:
    """The issue's targets, read off the groups."""
    out = {}
    lookup = f"qsjax_lookup_k{hf_lookup}_n2"
    if "grounded" in groups:
        g = groups["grounded"]
        best = max((n for n in g["variants"] if n.startswith("qsjax_lookup")),
                   key=lambda n: g["variants"][n]["decode_tokens_per_second"] or 0)
        out["grounded"] = {"lookup": lookup, "vs_plain": g["variants"][lookup]["vs_reference"], "target_vs_plain": 2.0,
                           "vs_hf_lookup": g["cross_engine"].get("qsjax_lookup_vs_hf_lookup"), "target_vs_hf_lookup": 1.5,
                           "identical": g["variants"][lookup]["identical"], "best_lookup": best,
                           "best_vs_plain": g["variants"][best]["vs_reference"]}
    if "open" in groups:
        v = groups["open"]["variants"]
        drafters = {n: v[n]["vs_reference"] for n in v if n.startswith("qsjax_") and n != "qsjax_plain"}
        out["open"] = {"vs_plain": drafters, "worst": min(drafters.values()), "target": 0.95,
                       "identical": all(v[n]["identical"] for n in drafters)}
    if "long" in groups:
        v = groups["long"]["variants"]
        out["long"] = {"lookup": lookup, "vs_plain": v[lookup]["vs_reference"], "identical": v[lookup]["identical"]}
    return out


def verify_cost(model, ids: list[int], ks, repeats: int) -> dict:
    """Seconds of a `run_step` of K + 1 tokens over a plain step's (T = 1), after the prompt `ids`; and
    of its LM head alone (`lm_head_seconds`: final norm and head over T positions), where the pass's
    extra rows cost most."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qsjax.dense.blocks import lm_logits
    from qsjax.dense.model import run_step
    from qsjax.runtime.buckets import cache_slots, prompt_bucket

    T = prompt_bucket(len(ids), model.cfg.max_positions)
    tokens = np.zeros((1, T), np.int32)
    tokens[0, T - len(ids):] = ids
    _, cache = model.prefill(tokens, np.array([T - len(ids)], np.int32), cache_slots(T, 128))
    step = jax.jit(lambda state, cache, run: run_step(model.module(state), cache, run, jnp.zeros(1, jnp.int32))[0])
    seconds = {t: timed(lambda: step(model.state, cache, jnp.zeros((1, t), jnp.int32)), repeats)
               for t in sorted({1, *(k + 1 for k in ks)})}
    head = jax.jit(lambda state, x: lm_logits(model.module(state), x))
    head_seconds = {t: timed(lambda: head(model.state, jnp.ones((1, t, model.cfg.d_model), jnp.float32)), repeats)
                    for t in seconds}
    return {"prompt_tokens": len(ids), "cache_slots": cache.length(), "seconds": {str(t): s for t, s in seconds.items()},
            "cost_over_plain_step": {str(t): seconds[t] / seconds[1] for t in seconds if t > 1},
            "lm_head_seconds": {str(t): s for t, s in head_seconds.items()}}


def format_table(report: dict) -> str:
    lines = []
    for name, g in report["groups"].items():
        qs = " under --quicksilver long" if g["quicksilver"] else ""
        lines.append(f"{name}: {len(g['prompt_tokens'])} prompt(s) of {min(g['prompt_tokens'].values())}-"
                     f"{max(g['prompt_tokens'].values())} tokens, up to {g['new_tokens']} new tokens{qs}")
        lines.append(f"  {'variant':24} {'decode/s':>9} {'vs ref':>7} {'TTFT s':>7} {'accept':>7} {'tok/step':>8} identical")
        for v, f in g["variants"].items():
            lines.append(f"  {v:24} {fmt(f['decode_tokens_per_second'], '9.1f')} {fmt(f['vs_reference'], '7.2f')} "
                         f"{f['first_token_seconds']:7.3f} {fmt(f['acceptance_rate'], '7.2f')} "
                         f"{fmt(f['mean_tokens_per_step'], '8.2f')} {'yes' if f['identical'] else 'NO'}")
        for k, r in g["cross_engine"].items():
            lines.append(f"  {k}: {fmt(r, '.2f')}")
    cost = report["verify_cost"]["cost_over_plain_step"]
    lines.append("verify pass of T tokens / plain step: " + ", ".join(f"T={t} {c:.2f}" for t, c in cost.items()))
    head, whole = report["verify_cost"]["lm_head_seconds"], report["verify_cost"]["seconds"]
    lines.append("of which the LM head: " + ", ".join(f"T={t} {1e3 * head[t]:.1f} of {1e3 * whole[t]:.1f} ms"
                                                      for t in whole))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.checkpoints.tokenizer import load_tokenizer
    from qsjax.quicksilver.settings import preset
    from qsjax.runtime.compilecache import enable_compilation_cache
    from qsjax.weights import resolve_model
    from speculative_prompts import prompt_groups

    enable_compilation_cache()
    model_dir = resolve_model(None)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    vs = variants(args, model.cfg.n_layers)
    groups = prompt_groups(tokenizer, args)
    longest = max(len(p.ids) + g.new_tokens for g in groups for p in g.prompts)
    if longest > model.cfg.max_positions:
        raise UsageError(f"a prompt and its new tokens ({longest}) exceed the model's context ({model.cfg.max_positions})")
    hf = None if args.skip_hf else load_hf(model_dir, args.threads)
    if hf is not None:
        import transformers

        transformers.logging.set_verbosity_error()
    quicksilver = preset("long", model.cfg.n_layers)
    runner = Runner(model, tokenizer, hf, quicksilver)
    calls = measure(runner, vs, groups, args.repeats)
    grouped = summarise(calls, vs, groups, args.hf_lookup)
    ks = sorted({v.speculation.num_tokens for v in vs if v.speculation is not None})
    report = {"command": " ".join(["python", "scripts/bench_speculative.py", *(sys.argv[1:] if argv is None else argv)]),
              "model": model_dir.name, "dtype": "float32", "batch": 1, "sampling": "greedy",
              "machine_at_start": machine(), "repeats": args.repeats, "torch_threads": args.threads,
              "variants": {v.name: {"engine": v.engine, "reference": v.reference, "long": v.long,
                                    "speculation": None if v.speculation is None else v.speculation.to_json(),
                                    "transformers_options": dict(v.hf_options) or None} for v in vs},
              "quicksilver_long": dataclasses.asdict(quicksilver), "groups": grouped,
              "transformers_assistant_early_exit": "run" if args.hf_exit else
              "not run (--hf-exit): transformers supports it for Llama (EarlyExitCandidateGenerator runs the "
              "model with num_hidden_layers set to E), at 0.1-0.2 tokens/s on a shared 2-core machine",
              "targets": targets(grouped, args.hf_lookup),
              "verify_cost": verify_cost(model, groups[0].prompts[0].ids, ks, 5 if args.quick else 20)}
    report["load_average_at_end"] = machine()["load_average"]
    return write_report(args.json, report, format_table(report))


if __name__ == "__main__":
    run_cli(main)
