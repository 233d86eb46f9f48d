"""One causal attention layer at SmolLM2-135M's shapes: `qsjax.dense.attention` against the attention qsjax
used before (a stored mask, 128-query blocks: `benchlib.masked_attention`) and PyTorch's
scaled_dot_product_attention(is_causal=True), in one run.

    python scripts/bench_attention.py --lengths 2048 8192 --repeats 5 --json bench_attention.json
    python scripts/bench_attention.py --lengths 8192 --blocks 256x512 512x512 512x1024   # block sweep
    python scripts/bench_attention.py --lengths 2048 --parts   # where one block step's time goes

B=1, H=9 query heads, K=3 key/value heads, Dh=64, float32, random inputs. Variants are interleaved
within each repeat; medians are reported, compile time apart. GFLOP/s count the causal half only:
2 * 2 * B * H * Dh * T (T + 1) / 2. `--parts` adds a profile of one step of the blockwise loop (one
query block against one key block, qsjax's block sizes): the step, masked and not, and its pieces
(the score matmul, the value matmul, the max pass, the exp-and-sum pass) each compiled alone, and per
length the steps the loop runs and the share of executed (query, key) pairs the causal rule needs.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchlib import check_json_path, check_positive, log, machine, masked_attention, median, write_report
from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli

B, H, K, DH = 1, 9, 3, 64


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/bench_attention.py", description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--blocks", nargs="*", default=[], help="extra block sizes QxK for the blockwise path")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (default 2)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--parts", action="store_true", help="also profile one step of the blockwise loop")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    check_positive(args, "repeats", "threads")
    if min(args.lengths) < 1:
        raise UsageError("--lengths must be positive")
    for b in args.blocks:
        if not (b.count("x") == 1 and all(s.isdigit() and int(s) > 0 for s in b.split("x"))):
            raise UsageError(f"--blocks takes QxK sizes such as 256x512, got {b!r}")
    check_json_path(args.json)
    return args


def bench(T: int, args) -> dict:
    import jax
    import jax.numpy as jnp

    from qsjax.dense import attention as A

    r = np.random.default_rng(0)
    q, k, v = (r.normal(size=(B, T, heads, DH)).astype(np.float32) for heads in (H, K, K))
    slots = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    ok = jnp.ones((B, T), bool)
    fns = {"masked_attention": lambda q, k, v: masked_attention(q, k, v, slots, slots, ok),
           "attention": lambda q, k, v: A.attention(q, k, v, slots, slots, ok)}
    for b in args.blocks:
        bq, bk = map(int, b.split("x"))
        fns[f"attention_{b}"] = lambda q, k, v, bq=bq, bk=bk: A._blockwise(
            q, A._heads(k), A._heads(v), slots, slots, ok, bias=None, self_visible=False, window=None, bq=bq, bk=bk)
    runs, outs, compile_s = {}, {}, {}
    for name, f in fns.items():
        t0 = time.perf_counter()
        compiled = jax.jit(f).lower(q, k, v).compile()
        compile_s[name] = time.perf_counter() - t0
        runs[name] = lambda c=compiled: c(q, k, v).block_until_ready()
        outs[name] = np.asarray(runs[name]())
    if not args.skip_torch:
        import torch

        torch.set_num_threads(args.threads)
        tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))  # [B, heads, T, Dh]

        def run_torch():
            with torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)

        runs["torch_sdpa"] = run_torch
        outs["torch_sdpa"] = run_torch().transpose(1, 2).numpy()
    times = {name: [] for name in runs}
    for i in range(args.repeats):
        for name in list(runs)[i % len(runs):] + list(runs)[:i % len(runs)]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    flops = 2 * 2 * B * H * DH * T * (T + 1) / 2
    med = {name: median(ts) for name, ts in times.items()}
    res = {"T": T, "seconds": med, "seconds_all": times, "seconds_compile": compile_s,
           "max_abs_diff_vs_masked_attention": {n: float(np.abs(o - outs["masked_attention"]).max()) for n, o in outs.items()},
           "gflops_per_second": {n: flops / s / 1e9 for n, s in med.items()},
           "speedup_vs_masked_attention": {n: med["masked_attention"] / s for n, s in med.items()}}
    if "torch_sdpa" in med:
        res["speedup_vs_torch"] = {n: med["torch_sdpa"] / s for n, s in med.items()}
    log(f"T={T}: " + ", ".join(f"{n} {s:.3f} s" for n, s in med.items()))
    return res


def parts(args) -> dict:
    """One online-softmax step of the blockwise loop and its pieces, each compiled alone (inputs as
    arguments, so that XLA cannot fold them), interleaved, medians."""
    import jax
    import jax.numpy as jnp

    from qsjax.dense import attention as A

    bq, bk, G = A.QUERY_BLOCK, A.KEY_BLOCK, H // K
    r = np.random.default_rng(0)
    qb, kb, vb = (jnp.asarray(r.normal(size=(B, K, *rows, DH)).astype(np.float32)) for rows in ((G, bq), (bk,), (bk,)))
    s = jnp.einsum("bkgqd,bksd->bkgqs", qb, kb)  # [B, K, G, bq, bk] scores
    m = s.max(-1, keepdims=True)
    mask = jnp.tril(jnp.ones((bq, bk), bool))[None]
    carry = A._init(B, K, G, bq, DH)
    pieces = {"step": (lambda c, q, k, v: A._update(c, q, k, v, None, None), (carry, qb, kb, vb)),
              "step_masked": (lambda c, q, k, v, w: A._update(c, q, k, v, w, None), (carry, qb, kb, vb, mask)),
              "scores_qk": (lambda q, k: jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=jnp.float32), (qb, kb)),
              "values_pv": (lambda p, v: jnp.einsum("bkgqs,bksd->bkgqd", p, v, preferred_element_type=jnp.float32), (s, vb)),
              "max": (lambda s: s.max(-1), (s,)),
              "exp_sum": (lambda s, m: jnp.exp(s - m).sum(-1), (s, m))}
    runs = {n: (lambda c=jax.jit(f).lower(*a).compile(), a=a: jax.block_until_ready(c(*a))) for n, (f, a) in pieces.items()}
    times = {n: [] for n in runs}
    for i in range(20 * args.repeats):
        for n in list(runs)[i % len(runs):] + list(runs)[:i % len(runs)]:
            t0 = time.perf_counter()
            runs[n]()
            times[n].append(time.perf_counter() - t0)
    med = {n: median(ts) for n, ts in times.items()}
    matmul = 2 * B * K * G * bq * bk * DH
    steps = {T: A.causal_pairs_executed(T) // (bq * bk) for T in args.lengths if T * T > A.DIRECT_MAX}  # blockwise only
    return {"block": [bq, bk], "seconds": med,
            "gflops_per_second": {n: matmul / med[n] / 1e9 for n in ("scores_qk", "values_pv")},
            "share_of_step": {n: med[n] / med["step"] for n in ("scores_qk", "values_pv", "max", "exp_sum")},
            "steps_per_layer": steps,
            "causal_share_of_executed_pairs": {T: T * (T + 1) / 2 / A.causal_pairs_executed(T) for T in args.lengths}}


def format_table(report: dict) -> str:
    lines = [f"{'T':>6} {'variant':22} {'seconds':>9} {'GFLOP/s':>8} {'vs masked':>10} {'vs torch':>9}"]
    for r in report["results"]:
        for n, s in r["seconds"].items():
            vs_torch = r.get("speedup_vs_torch", {}).get(n)
            lines.append(f"{r['T']:6d} {n:22} {s:9.3f} {r['gflops_per_second'][n]:8.1f} "
                         f"{r['speedup_vs_masked_attention'][n]:10.2f} {'-' if vs_torch is None else f'{vs_torch:9.2f}'}")
    if "parts" in report:
        p = report["parts"]
        lines.append(f"one step, block {p['block'][0]}x{p['block'][1]}: " + ", ".join(
            f"{n} {s * 1e6:.0f} us" + (f" ({p['share_of_step'][n]:.0%})" if n in p["share_of_step"] else "")
            for n, s in p["seconds"].items()))
        lines.append("matmul GFLOP/s: " + ", ".join(f"{n} {g:.0f}" for n, g in p["gflops_per_second"].items()))
        lines.append("per layer: " + ", ".join(f"T={T} {n} steps, causal pairs {p['causal_share_of_executed_pairs'][T]:.0%} "
                                               "of executed" for T, n in p["steps_per_layer"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from qsjax.dense import attention as A

    report = {"command": " ".join(["python", "scripts/bench_attention.py", *(sys.argv[1:] if argv is None else argv)]),
              "machine_at_start": machine(), "blocks": [A.QUERY_BLOCK, A.KEY_BLOCK], "direct_max": A.DIRECT_MAX,
              "results": [bench(T, args) for T in args.lengths]}
    if args.parts:
        report["parts"] = parts(args)
    return write_report(args.json, report, format_table(report))


if __name__ == "__main__":
    run_cli(main)
