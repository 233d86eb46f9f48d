"""QuickSilver `fast` against dense qsjax and Hugging Face PyTorch, on the real default model, in one run.

    python scripts/bench_quicksilver.py --json bench_quicksilver.json

reproduces the README's figures: the defaults, the first 16,384 tokens of each data set (29 windows),
3 repeats, generation with a 2,048-token prompt and 128 new tokens. That is about 700 forward passes
of a 2,048-token window, a few hours on 2 CPU cores; `--max-eval-tokens 0` scores the whole streams
(about 1,570 windows per variant and repeat: days on 2 cores). Run it on an otherwise idle machine:
PyTorch's OpenMP threads slow down many times over when another process holds the cores (the
report records the load average at the start and at the end).

Perplexity: SmolLM2-135M-Instruct (float32) on WikiText-103 test and the C4 sample, strided
protocol (--max-length 2048 --stride 512), one window per forward pass, four variants over the same
windows and the same scored tokens:

    dense_qsjax      qsjax.perplexity.Scorer (the LM head on scored positions only)
    fast_masked      QuickSilver preset `fast`, every row run and masked (the reference semantics)
    fast_compacted   QuickSilver preset `fast`, only the computing rows run (the preset as shipped)
    hf_dense         transformers LlamaForCausalLM from the same GGUF, torch float32; the LM head on
                     the scored positions only (`logits_to_keep`, where the model takes it) or, with
                     --hf-all-logits, on every position as `model(input_ids).logits` computes it;
                     NLL in float32 per token, summed in float64, as qsjax does

Every shape is compiled (and every variant run once on the first window) before the clock starts:
`seconds_compile` and `seconds_warmup` are reported apart and are not part of the medians. Each
repeat runs every variant once per data set, the order rotated from repeat to repeat; `seconds` is
the median over the repeats of the scoring loop's wall-clock time. `flops_total` is the executed
work as each harness counts it (qsjax.flops for dense qsjax, padding and causal query blocks
included; QuickSilver's accounting from its decisions, needed causal pairs plus the mechanisms'
overhead; Hugging Face: the causal pairs a window needs, the LM head where logits were computed).

Generation (qsjax.generate.Generator, greedy, EOS ignored so every row makes exactly the number of
tokens asked for; transformers `generate` with min_new_tokens): time to first token for a
--prompt-tokens prompt (default 2,048 tokens of WikiText-103 test), and decode speed for
--new-tokens new tokens (default 128) at batch 1 and 8 after --decode-prompt-tokens prompt tokens
(consecutive slices of WikiText-103 test, all the same length, so left padding never applies).
`tokens_per_second` is batch x new tokens over the whole call (prefill included);
`decode_tokens_per_second` is batch x (new tokens - 1) over the call minus a one-token call on the
same prompts.

Profile (`profile`, see `bench_profile`): where one window's time goes, piece by piece (embedding,
a plain block, the decision layer's step, a step above it with only the computing tokens, LM head),
against the whole windows, and the speed-up bound if the layers above the decision layer were free.

`targets` lists the issue's targets with the measured value and whether it is met; nothing is
asserted. Progress goes to stderr, a table to stdout (stderr with --json -). Compilation is cold
(no persistent cache) unless --compilation-cache is given.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from qsjax.cli import ArgumentParser, UsageError, run_cli
from qsjax.eval import write_json_atomic

DATASETS = ("wikitext103", "c4")
DECODE_BATCHES = (1, 8)


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
    p.add_argument("--prompt-tokens", type=int, default=2048, help="time-to-first-token prompt length (default 2048)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode: new tokens per row (default 128)")
    p.add_argument("--decode-prompt-tokens", type=int, default=128, help="decode: prompt length (default 128)")
    p.add_argument("--skip-hf", action="store_true", help="leave out Hugging Face PyTorch")
    p.add_argument("--skip-generate", action="store_true", help="leave out the generation measurements")
    p.add_argument("--skip-perplexity", action="store_true", help="leave out the perplexity measurements")
    p.add_argument("--skip-profile", action="store_true", help="leave out the per-piece profile of one window")
    p.add_argument("--hf-all-logits", action="store_true",
                   help="Hugging Face: compute the logits of every position (default: scored positions only)")
    p.add_argument("--compilation-cache", action="store_true",
                   help="use qsjax's persistent compilation cache (compile seconds then mostly read it from disk)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Checks that need neither the model nor the data."""
    if args.max_eval_tokens != 0 and args.max_eval_tokens < 2:
        raise UsageError(f"--max-eval-tokens must be at least 2 (or 0 for the whole stream), got {args.max_eval_tokens}")
    if args.max_length < 2:
        raise UsageError(f"--max-length must be at least 2, got {args.max_length}")
    if not 0 < args.stride <= args.max_length:
        raise UsageError(f"--stride must be in 1..--max-length ({args.max_length}), got {args.stride}")
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.prompt_tokens < 1:
        raise UsageError(f"--prompt-tokens must be at least 1, got {args.prompt_tokens}")
    if args.decode_prompt_tokens < 1:
        raise UsageError(f"--decode-prompt-tokens must be at least 1, got {args.decode_prompt_tokens}")
    if args.new_tokens < 2:
        raise UsageError(f"--new-tokens must be at least 2 (decode speed is measured past the first), got {args.new_tokens}")
    if args.skip_perplexity and args.skip_generate and args.skip_profile:
        raise UsageError("--skip-perplexity, --skip-generate and --skip-profile leave nothing to measure")
    if args.json not in (None, "-"):
        if Path(args.json).is_dir():
            raise UsageError(f"--json {args.json} is a directory; give a file name")
        if not Path(args.json).parent.is_dir():
            raise UsageError(f"--json {args.json}: directory {Path(args.json).parent} does not exist")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rotated(names, r: int) -> list[str]:
    """The run order of repeat r: the variants rotated by r places."""
    names = list(names)
    k = r % len(names)
    return names[k:] + names[:k]


def median(xs):
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


# ----------------------------------------------------------------------------------------------
# Perplexity


class HFScorer:
    """Hugging Face dense NLL over one window at a time, torch float32."""

    def __init__(self, hf, cfg, all_logits: bool):
        self.hf, self.cfg = hf, cfg
        takes = "logits_to_keep" in inspect.signature(hf.forward).parameters
        self.scored_only = takes and not all_logits
        self.lm_head = "scored only" if self.scored_only else "all positions"

    def window_nll(self, tokens: np.ndarray, offset: int):
        """NLL of tokens offset+1..T-1 of one window [T] -> (nll [T-1-offset] float32 numpy, LM-head positions)."""
        import torch

        T = len(tokens)
        ids = torch.from_numpy(tokens.astype(np.int64))[None]
        with torch.inference_mode():
            if self.scored_only:
                z = self.hf(ids, use_cache=False, logits_to_keep=torch.arange(offset, T - 1)).logits[0]
                positions = T - 1 - offset
            else:
                z = self.hf(ids, use_cache=False).logits[0, offset:T - 1]
                positions = T
            z = z.float()
            target = ids[0, offset + 1:]
            nll = torch.logsumexp(z, dim=-1) - z.gather(-1, target[:, None])[:, 0]
        return nll.numpy(), positions

    def evaluate(self, stream: np.ndarray, windows):
        """Like qsjax.perplexity.evaluate, batch 1, no padding.  -> PerplexityResult"""
        from qsjax.flops import Flops, forward_flops
        from qsjax.perplexity import PerplexityResult

        token_nll = np.full(len(stream), np.nan, np.float32)
        nll_sum, scored, flops = 0.0, 0, Flops()
        t0 = time.perf_counter()
        for w in windows:
            nll, positions = self.window_nll(stream[w.begin:w.end], w.offset)
            token_nll[w.first_scored:w.end] = nll
            nll_sum += float(nll.astype(np.float64).sum())
            scored += len(nll)
            L, n = self.cfg.n_layers, w.length
            flops += forward_flops(self.cfg, [n] * L, [n * (n + 1) // 2] * L, positions)
        seconds = time.perf_counter() - t0
        return PerplexityResult(nll_sum, scored, len(windows), len(windows), seconds, 0.0, flops, token_nll)


def perplexity_variants(model, hf, qs):
    """name -> (warm-up function (-> (seconds_compile, seconds_warmup)), run function (-> (result, extra stats))).
    Fresh scorers each call: every data set compiles its shapes cold."""
    from qsjax.perplexity import Scorer, evaluate, make_batches
    from qsjax.quicksilver.evaluate import QuickSilverScorer, evaluate_quicksilver

    out = {}
    dense = Scorer(model)

    def dense_warm(stream, windows):
        batches = make_batches(windows, 1)
        compile_s = sum(dense.compile(*key) for key in dict.fromkeys(b.key for b in batches))
        t0 = time.perf_counter()
        dense(batches[0].tokens(stream), batches[0].offset)
        return compile_s, time.perf_counter() - t0

    out["dense_qsjax"] = (dense_warm, lambda stream, windows: (evaluate(dense, stream, windows, 1, progress=False), None))

    for name, compact in (("fast_masked", False), ("fast_compacted", True)):
        scorer = QuickSilverScorer(model, dataclasses.replace(qs, compact=compact))

        def qs_warm(stream, windows, scorer=scorer):
            batches = make_batches(windows, 1)
            compile_s = sum(scorer.compile(*key) for key in dict.fromkeys(b.key for b in batches))
            b = batches[0]
            t0 = time.perf_counter()
            outputs = scorer(b.tokens(stream), np.array([w.length for w in b.windows], np.int32), b.offset)
            np.asarray(outputs[0])
            return compile_s, time.perf_counter() - t0

        def qs_run(stream, windows, scorer=scorer):
            result, stats, _ = evaluate_quicksilver(scorer, stream, windows, 1, progress=False)
            return result, stats

        out[name] = (qs_warm, qs_run)

    if hf is not None:
        def hf_warm(stream, windows):
            t0 = time.perf_counter()
            hf.window_nll(stream[windows[0].begin:windows[0].end], windows[0].offset)
            return 0.0, time.perf_counter() - t0

        out["hf_dense"] = (hf_warm, lambda stream, windows: (hf.evaluate(stream, windows), None))
    return out


def bench_perplexity(data: str, stream: np.ndarray, windows, variants: dict, repeats: int) -> dict:
    """Warm up every variant, then `repeats` interleaved runs.  -> the data set's report."""
    entry = {name: {"seconds_all": []} for name in variants}
    for name, (warm, _) in variants.items():
        compile_s, warm_s = warm(stream, windows)
        entry[name].update(seconds_compile=compile_s, seconds_warmup=warm_s)
        log(f"[{data}] {name}: compiled in {compile_s:.1f} s, warm-up forward {warm_s:.2f} s")
    results, orders = {}, []
    for r in range(repeats):
        order = rotated(variants, r)
        orders.append(order)
        for name in order:
            result, stats = variants[name][1](stream, windows)
            entry[name]["seconds_all"].append(result.seconds)
            prev = results.get(name)
            if prev is not None and prev[0].nll_sum != result.nll_sum:
                entry[name].setdefault("nll_sum_changed_between_repeats", []).append(result.nll_sum - prev[0].nll_sum)
            results[name] = (result, stats)
            log(f"[{data}] repeat {r + 1}/{repeats} {name}: {result.seconds:.1f} s, "
                f"{result.tokens_per_second:.1f} tokens/s, perplexity {result.perplexity:.4f}")

    for name, e in entry.items():
        result, stats = results[name]
        seconds = median(e["seconds_all"])
        e.update(
            seconds=seconds,
            seconds_with_compile=seconds + e["seconds_compile"],
            tokens_scored=result.tokens_scored,
            tokens_per_second=result.tokens_scored / seconds,
            perplexity=result.perplexity,
            nll_mean=result.nll_mean,
            flops_total=result.flops.total,
            flops_per_token=result.flops.total / result.tokens_scored,
            flops=result.flops.to_json(result.tokens_scored),
        )
        if stats is not None:
            e["executed_flops_reduction"] = stats["executed_flops_reduction"]
            e["fraction_token_layers_executed"] = stats["fraction_token_layers_executed"]
            e["kv_writes_skipped_fraction"] = stats["kv_writes_skipped_fraction"]
            e["dense_needed_flops"] = stats["dense_needed_flops"]
        # keep the per-token NLL for the checks, out of the JSON
        e["_token_nll"] = result.token_nll
    for name, e in entry.items():
        e["speedup_vs_dense_qsjax"] = ratio(entry["dense_qsjax"]["seconds"], e["seconds"])
        e["speedup_with_compile_vs_dense_qsjax"] = ratio(entry["dense_qsjax"]["seconds_with_compile"], e["seconds_with_compile"])
        e["speedup_vs_hf"] = ratio(entry["hf_dense"]["seconds"], e["seconds"]) if "hf_dense" in entry else None
        e["speedup_with_compile_vs_hf"] = (ratio(entry["hf_dense"]["seconds_with_compile"], e["seconds_with_compile"])
                                           if "hf_dense" in entry else None)
        e["perplexity_minus_dense_qsjax"] = e["perplexity"] - entry["dense_qsjax"]["perplexity"]
        e["flops_vs_dense_qsjax"] = e["flops_total"] / entry["dense_qsjax"]["flops_total"]

    def nll_diff(a, b):
        x, y = entry[a]["_token_nll"], entry[b]["_token_nll"]
        both = np.isfinite(x) & np.isfinite(y)
        return float(np.abs(x[both] - y[both]).max()), int((np.isfinite(x) != np.isfinite(y)).sum())

    checks = {}
    d, n = nll_diff("fast_masked", "fast_compacted")
    checks["masked_minus_compacted_perplexity"] = entry["fast_masked"]["perplexity"] - entry["fast_compacted"]["perplexity"]
    checks["masked_vs_compacted_max_token_nll_difference"] = d
    checks["masked_vs_compacted_scored_positions_differ"] = n
    if "hf_dense" in entry:
        diff = entry["hf_dense"]["perplexity"] - entry["dense_qsjax"]["perplexity"]
        d, n = nll_diff("hf_dense", "dense_qsjax")
        checks.update(
            hf_minus_dense_qsjax_perplexity=diff,
            hf_agrees_within_0_01=abs(diff) <= 0.01,
            hf_vs_dense_qsjax_max_token_nll_difference=d,
            hf_vs_dense_qsjax_scored_positions_differ=n,
        )
    for e in entry.values():
        del e["_token_nll"]
    return {"tokens_total": len(stream), "windows": len(windows),
            "tokens_scored": entry["dense_qsjax"]["tokens_scored"], "order": orders, "variants": entry, "checks": checks}


# ----------------------------------------------------------------------------------------------
# Generation


def bench_generation(model, tokenizer, qs, hf_model, stream: np.ndarray, args) -> dict:
    """Time to first token for one long prompt, and decode speed at batch 1 and 8, interleaved."""
    from qsjax.generate import Generator

    gens = {"dense_qsjax": Generator(model, tokenizer), "fast": Generator(model, tokenizer, qs)}
    for g in gens.values():
        g.eos_ids = ()  # exactly the tokens asked for, like min_new_tokens in transformers
    P, N = args.prompt_tokens, args.new_tokens
    long_prompt = [stream[:P].tolist()]
    decode_prompts = {b: [stream[i * args.decode_prompt_tokens:(i + 1) * args.decode_prompt_tokens].tolist()
                          for i in range(b)] for b in DECODE_BATCHES}
    # (measurement, prompts, new tokens)
    cases = [("ttft", long_prompt, 1)]
    for b in DECODE_BATCHES:
        cases += [(f"batch_{b}_first", decode_prompts[b], 1), (f"batch_{b}_generate", decode_prompts[b], N)]

    def run_hf(prompts, n):
        import torch

        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_id or 0)
        assert out.shape == (len(prompts), len(prompts[0]) + n), out.shape
        return out[:, len(prompts[0]):].tolist()

    def run(name, prompts, n):
        """-> (seconds, seconds_compile, new token ids)"""
        if name == "hf_dense":
            t0 = time.perf_counter()
            out = run_hf(prompts, n)
            return time.perf_counter() - t0, 0.0, out
        res = gens[name](prompts, max_new_tokens=n)
        assert all(len(t) == n for t in res.token_ids), [len(t) for t in res.token_ids]
        return res.seconds, res.seconds_compile, res.token_ids

    names = list(gens) + (["hf_dense"] if hf_model is not None else [])
    times = {(c, v): [] for c, _, _ in cases for v in names}
    compile_s, warm_s, tokens = {}, {}, {}
    for case, prompts, n in cases:  # compile (qsjax) and warm up (all) every case
        for v in names:
            t0 = time.perf_counter()
            _, c, _ = run(v, prompts, n)
            compile_s[(case, v)], warm_s[(case, v)] = c, time.perf_counter() - t0 - c
        log(f"[generate] {case}: compiled and warmed up")
    for r in range(args.repeats):
        for case, prompts, n in cases:
            for v in rotated(names, r):
                s, _, out = run(v, prompts, n)
                times[(case, v)].append(s)
                if case == f"batch_{DECODE_BATCHES[0]}_generate":
                    tokens[v] = out[0]
        log(f"[generate] repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{v} first token {times[('ttft', v)][-1]:.2f} s" for v in names))

    def cell(case, v):
        return {"seconds": median(times[(case, v)]), "seconds_all": times[(case, v)],
                "seconds_compile": compile_s[(case, v)], "seconds_warmup": warm_s[(case, v)]}

    ttft = {v: cell("ttft", v) for v in names}
    for v, e in ttft.items():
        e["speedup_vs_dense_qsjax"] = ratio(ttft["dense_qsjax"]["seconds"], e["seconds"])
        e["speedup_vs_hf"] = ratio(ttft["hf_dense"]["seconds"], e["seconds"]) if "hf_dense" in ttft else None
    decode = {}
    for b in DECODE_BATCHES:
        d = {}
        for v in names:
            full, first = cell(f"batch_{b}_generate", v), cell(f"batch_{b}_first", v)
            d[v] = {**full, "first_token_seconds": first["seconds"], "first_token_seconds_all": first["seconds_all"],
                    "first_token_seconds_compile": first["seconds_compile"],
                    "tokens_per_second": b * N / full["seconds"],
                    "decode_tokens_per_second": b * (N - 1) / (full["seconds"] - first["seconds"])
                    if full["seconds"] > first["seconds"] else None}
        for v, e in d.items():
            for key in ("tokens_per_second", "decode_tokens_per_second"):
                e[f"{key}_vs_dense_qsjax"] = ratio(e[key], d["dense_qsjax"][key])
                e[f"{key}_vs_hf"] = ratio(e[key], d["hf_dense"][key]) if "hf_dense" in d else None
        decode[f"batch_{b}"] = d
    same = {v: tokens[v] == tokens["dense_qsjax"] for v in names}
    return {
        "prompt_tokens": P, "new_tokens": N, "decode_prompt_tokens": args.decode_prompt_tokens,
        "decode_batches": list(DECODE_BATCHES), "time_to_first_token": ttft, "decode": decode,
        "batch_1_tokens_equal_dense_qsjax": same,
        "batch_1_texts": {v: tokenizer.decode(t) for v, t in tokens.items()},
    }


# ----------------------------------------------------------------------------------------------
# Profile: where one window's time goes


def bench_profile(model, qs, stream: np.ndarray, args) -> dict:
    """One strided window (the second: --max-length tokens, the last --stride scored), dense qsjax
    against the preset, each piece jitted alone on the real weights and timed (median of 5 x
    --repeats calls): the embedding, one plain block over the window, the decision layer's step
    (every token computes), one step above it with the preset's own decisions (only the tokens still
    computing run: bucketed compaction), and the LM head with the NLL on the scored positions. The
    sums of the pieces are set against the whole windows timed the same way, and `bound` is the
    speed-up the preset would reach if the layers above its decision layer cost nothing."""
    import jax
    import jax.numpy as jnp

    from qsjax.layers import causal_mask
    from qsjax.model import block
    from qsjax.perplexity import Scorer
    from qsjax.quicksilver.compaction import compaction_buckets
    from qsjax.quicksilver.evaluate import QuickSilverScorer
    from qsjax.quicksilver.forward import Tokens, first_decision_layer, layer_step
    from qsjax.rope import rope_angles

    cfg = model.cfg
    L, T, offset = cfg.n_layers, args.max_length, args.max_length - args.stride
    d = first_decision_layer(qs, L)
    tokens = np.asarray(stream[args.stride:args.stride + T], np.int32)[None]
    if tokens.shape[1] < T:
        raise UsageError(f"the profile needs {args.stride + T} tokens of WikiText-103 test")
    scorer = QuickSilverScorer(model, qs)
    halt = np.asarray(scorer(tokens, np.array([T], np.int32), offset)[3][0])  # [1, T]: layer after which each stopped
    positions = jnp.arange(T)[None]
    cos, sin = rope_angles(cfg, positions)
    causal = causal_mask(jnp.arange(T), jnp.arange(T), jnp.ones((1, T), bool))
    valid = jnp.ones((1, T), bool)
    eligible = (positions < offset) & (positions >= qs.n_sink)
    ctx = (cos, sin, causal, valid, eligible, positions, positions >= offset)

    def qs_step(layer, active):
        def f(m, x):
            tok = Tokens(x=x, active=active, alive=valid, halt=jnp.where(active, L, layer - 1).astype(jnp.int32),
                         fused=~valid, absorbed=~valid, size=jnp.ones((1, T), jnp.float32), bits=jnp.full((1, T), 8, jnp.int32))
            return layer_step(qs, m, m.blocks[layer - 1], layer, tok, ctx, compaction_buckets(T))[0].x
        return f

    pieces = {
        "embed": lambda m, t: m.embed(t, positions),
        "plain_block": lambda m, x: block(m.blocks[d - 1], x, cos, sin, causal)[0],
        "decision_layer_step": qs_step(d, valid),
        "step_above_decision_layer": qs_step(d + 1, jnp.asarray(halt > d)),
        "lm_head_and_nll": lambda m, x, t: jax.nn.logsumexp(z := m.logits(x[:, offset:-1]), -1)
        - jnp.take_along_axis(z, t[:, offset + 1:, None], -1)[..., 0],
    }
    x = jax.jit(lambda s, t: model.module(s).embed(t, positions))(model.state, tokens)
    operands = {"embed": (tokens,), "lm_head_and_nll": (x, tokens)}
    dense = Scorer(model)

    def timed(f, *a):
        jax.block_until_ready(f(*a))  # compile and warm up
        ts = []
        for _ in range(5 * args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - t0)
        return median(ts)

    seconds = {}
    for name, fn in pieces.items():
        jitted = jax.jit(lambda state, *a, fn=fn: fn(model.module(state), *a))
        seconds[name] = timed(jitted, scorer.model.state if name.endswith("step") else model.state,
                              *operands.get(name, (x,)))
        log(f"[profile] {name}: {seconds[name] * 1e3:.1f} ms")
    dense(tokens, offset)
    seconds["window_dense_qsjax"] = timed(lambda: dense(tokens, offset))
    seconds["window_preset"] = timed(lambda: scorer(tokens, np.array([T], np.int32), offset)[0])
    above = L - d
    model_dense = seconds["embed"] + L * seconds["plain_block"] + seconds["lm_head_and_nll"]
    below = seconds["embed"] + (d - 1) * seconds["plain_block"] + seconds["decision_layer_step"] + seconds["lm_head_and_nll"]
    model_preset = below + above * seconds["step_above_decision_layer"]
    return {
        "window_tokens": T, "scored_tokens": args.stride, "decision_layer": d, "layers_above": above,
        "tokens_computing_above": int((halt > d).sum()),
        "seconds": seconds,
        "sum_of_pieces": {"dense_qsjax": model_dense, "preset": model_preset},
        "share_of_dense_window": {"embed": seconds["embed"] / model_dense,
                                  "blocks": L * seconds["plain_block"] / model_dense,
                                  "lm_head_and_nll": seconds["lm_head_and_nll"] / model_dense},
        "step_above_vs_plain_block": seconds["step_above_decision_layer"] / seconds["plain_block"],
        "decision_step_vs_plain_block": seconds["decision_layer_step"] / seconds["plain_block"],
        "speedup_measured": seconds["window_dense_qsjax"] / seconds["window_preset"],
        "speedup_from_pieces": model_dense / model_preset,
        "bound": model_dense / below,
    }


# ----------------------------------------------------------------------------------------------
# Targets and the table


def targets(report: dict) -> list[dict]:
    out = []

    def add(name, target, measured, ok, **extra):
        out.append({"name": name, "target": target, "measured": measured,
                    "met": None if measured is None else bool(ok(measured)), **extra})

    for data, d in report.get("perplexity", {}).items():
        v = d["variants"]
        add(f"fast_perplexity_increase_{data}", "<= +0.2 perplexity vs dense qsjax",
            v["fast_compacted"]["perplexity_minus_dense_qsjax"], lambda x: x <= 0.2, data=data)
        add(f"fast_evaluation_speedup_{data}", ">= 1.25x dense qsjax wall-clock (median seconds, compile excluded)",
            v["fast_compacted"]["speedup_vs_dense_qsjax"], lambda x: x >= 1.25, data=data)
        add(f"dense_qsjax_vs_hf_tokens_per_second_{data}", ">= 1.2x Hugging Face PyTorch scored tokens/s",
            v["dense_qsjax"]["speedup_vs_hf"],  # same tokens scored: the ratio of tokens/s
            lambda x: x >= 1.2, data=data)
    if "generation" in report:
        g = report["generation"]
        add(f"fast_time_to_first_token_speedup_{g['prompt_tokens']}", ">= 1.25x shorter than dense qsjax",
            g["time_to_first_token"]["fast"]["speedup_vs_dense_qsjax"], lambda x: x >= 1.25)
    return out


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(report: dict) -> str:
    lines = []
    for data, d in report.get("perplexity", {}).items():
        lines.append(f"{data}: {d['tokens_scored']:,} tokens scored in {d['windows']} windows "
                     f"(strided {report['protocol']['max_length']}/{report['protocol']['stride']})")
        lines.append(f"  {'variant':16} {'ppl':>9} {'seconds':>9} {'+compile':>9} {'tok/s':>8} {'GFLOP/tok':>10} "
                     f"{'vs dense':>9} {'vs hf':>7}")
        for name, e in d["variants"].items():
            lines.append(f"  {name:16} {e['perplexity']:9.4f} {e['seconds']:9.2f} {e['seconds_compile']:9.2f} "
                         f"{e['tokens_per_second']:8.1f} {e['flops_per_token'] / 1e9:10.3f} "
                         f"{fmt(e['speedup_vs_dense_qsjax'], '9.2f')} {fmt(e['speedup_vs_hf'], '7.2f')}")
    if "generation" in report:
        g = report["generation"]
        lines.append(f"generation: first token of a {g['prompt_tokens']}-token prompt; "
                     f"{g['new_tokens']} new tokens after {g['decode_prompt_tokens']} prompt tokens")
        lines.append(f"  {'variant':16} {'TTFT s':>8} {'vs dense':>9} " + " ".join(
            f"{f'b{b} tok/s':>9} {f'b{b} dec/s':>9}" for b in g["decode_batches"]))
        for v, e in g["time_to_first_token"].items():
            cols = " ".join(f"{g['decode'][f'batch_{b}'][v]['tokens_per_second']:9.1f} "
                            f"{fmt(g['decode'][f'batch_{b}'][v]['decode_tokens_per_second'], '9.1f')}"
                            for b in g["decode_batches"])
            lines.append(f"  {v:16} {e['seconds']:8.3f} {fmt(e['speedup_vs_dense_qsjax'], '9.2f')} {cols}")
    if "profile" in report:
        pr = report["profile"]
        sec = pr["seconds"]
        lines.append(f"profile of one {pr['window_tokens']}-token window ({pr['scored_tokens']} scored; decisions from "
                     f"layer {pr['decision_layer']}, {pr['tokens_computing_above']} tokens computing in the "
                     f"{pr['layers_above']} layers above):")
        for name, v in sec.items():
            lines.append(f"  {name:28} {v * 1e3:9.1f} ms")
        lines.append(f"  speed-up measured {pr['speedup_measured']:.3f}x, from the pieces {pr['speedup_from_pieces']:.3f}x, "
                     f"bound (layers above free) {pr['bound']:.3f}x")
    lines.append("targets:")
    for t in report["targets"]:
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"  {t['name']:48} {fmt(t['measured'], '+.3f'):>8}  {t['target']}: {met}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    t_start = time.perf_counter()

    import jax
    import torch
    import transformers

    from qsjax.compilecache import enable_compilation_cache
    from qsjax.data import read_text, resolve_data, tokenize
    from qsjax.params import load_model
    from qsjax.perplexity import strided_windows
    from qsjax.quicksilver.config import preset
    from qsjax.tokenizer import load_tokenizer
    from qsjax.weights import gguf_path, resolve_model

    torch.set_num_threads(args.threads)
    cache = str(enable_compilation_cache()) if args.compilation_cache else None
    data_names = ["wikitext103"] * (not (args.skip_generate and args.skip_profile)) + ([] if args.skip_perplexity else args.data)
    data_paths = {name: resolve_data(name) for name in dict.fromkeys(data_names)}

    model_dir = resolve_model(None)
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    seconds_load = {"qsjax": time.perf_counter() - t0}
    cfg = model.cfg
    if args.max_length > cfg.max_positions:
        raise UsageError(f"--max-length {args.max_length} is longer than the model's context ({cfg.max_positions})")
    if args.prompt_tokens + 1 > cfg.max_positions or args.decode_prompt_tokens + args.new_tokens > cfg.max_positions:
        raise UsageError(f"the prompts and new tokens must fit the model's context ({cfg.max_positions} positions)")
    qs = preset("fast", cfg.n_layers)

    hf = hf_scorer = None
    if not args.skip_hf:
        gguf = gguf_path(model_dir)
        if gguf is None:
            raise UsageError(f"{model_dir} holds no GGUF file for transformers to load; use --skip-hf")
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf.name, dtype=torch.float32).eval()
        seconds_load["hf"] = time.perf_counter() - t0
        hf_scorer = HFScorer(hf, cfg, args.hf_all_logits)

    log("tokenizing ...")
    streams = {}
    for name, path in data_paths.items():
        streams[name] = tokenize(tokenizer, read_text(path))
        if streams[name].max() >= cfg.vocab_size:
            raise UsageError(f"{path}: token id {streams[name].max()} is outside the vocabulary ({cfg.vocab_size})")

    report = {
        "command": " ".join(["python", "scripts/bench_quicksilver.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": model_dir.name, "model_dir": str(model_dir), "dtype": "float32",
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "torch_threads": args.threads,
        "load_average_at_start": os.getloadavg(), "compilation_cache": cache, "repeats": args.repeats,
        "seconds_load": seconds_load,
        "quicksilver": {"preset": "fast", "settings": dataclasses.asdict(qs)},
        "hf_lm_head": hf_scorer.lm_head if hf_scorer else None,
        "hf_attention": getattr(hf.config, "_attn_implementation", None) if hf is not None else None,
        "protocol": {"name": "strided", "max_length": args.max_length, "stride": args.stride},
        "batch_size": 1, "max_eval_tokens": args.max_eval_tokens or None,
        "data_paths": {k: str(v) for k, v in data_paths.items()},
    }

    if not args.skip_perplexity:
        report["perplexity"] = {}
        for data in args.data:
            stream = streams[data][: args.max_eval_tokens or None]
            if len(stream) < 2:
                raise UsageError(f"{data} gives {len(stream)} token(s); at least 2 are needed")
            windows = strided_windows(len(stream), args.max_length, args.stride)
            log(f"[{data}] {len(stream):,} tokens, {len(windows)} windows")
            variants = perplexity_variants(model, hf_scorer, qs)
            report["perplexity"][data] = bench_perplexity(data, stream, windows, variants, args.repeats)
            report["perplexity"][data]["tokens_total_in_data"] = len(streams[data])
            del variants

    if not args.skip_generate:
        stream = streams["wikitext103"]
        needed = max(args.prompt_tokens, max(DECODE_BATCHES) * args.decode_prompt_tokens)
        if len(stream) < needed:
            raise UsageError(f"WikiText-103 test gives {len(stream)} tokens; the prompts need {needed}")
        report["generation"] = bench_generation(model, tokenizer, qs, hf, stream, args)

    if not args.skip_profile:
        report["profile"] = bench_profile(model, qs, streams["wikitext103"], args)

    report["targets"] = targets(report)
    report["seconds_total"] = time.perf_counter() - t_start
    report["load_average_at_end"] = os.getloadavg()
    if args.json is not None:
        write_json_atomic(args.json, report)
    print(format_table(report), file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


if __name__ == "__main__":
    run_cli(main)
