"""Dense speed on the real default model: qsjax against transformers (PyTorch), prefill and decode,
in one run.

    python scripts/bench_dense.py --json bench_dense.json

SmolLM2-135M-Instruct (--dtype, float32 by default; transformers loads the same GGUF), prompts cut
from WikiText-103 test. Prefill: the last position's logits and a filled KV cache for one prompt of
each --prefill length (transformers: `use_cache=True, logits_to_keep=1`, as its `generate` does),
also with the attention qsjax used before `qsjax.dense.attention` (`benchlib.masked_attention`, a stored
mask) unless --skip-masked. Decode: greedy generation of --new-tokens tokens at each --batches size
after each --decode-prompts length (qsjax's compiled generation loop; transformers `generate` with
min_new_tokens); decode tokens/s = batch x (new tokens - 1) / (time for all - time for one token).
Every program is compiled and every variant run once first; then each repeat runs every case, the
variants rotated; medians, compile seconds apart, ratios from this run, the machine's CPU flags.
"""

from __future__ import annotations

import sys
import time
from unittest import mock

import numpy as np

from benchlib import (check_json_path, check_positive, fmt, load_hf, log, machine, masked_attention, median, ratio,
                      rotated, torch_run, write_report)
from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/bench_dense.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE (- for stdout)")
    p.add_argument("--prefill", type=int, nargs="*", default=[512, 2048, 4096, 8192], help="prefill lengths")
    p.add_argument("--decode-prompts", type=int, nargs="*", default=[16, 4096], help="prompt lengths before decoding")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes (default 1 8)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode: new tokens per row (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported (default 3)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (default 2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both frameworks' weights")
    p.add_argument("--skip-hf", action="store_true", help="leave out transformers")
    p.add_argument("--skip-masked", action="store_true", help="leave out the masked-attention baseline")
    return p.parse_args(argv)


def check_args(args) -> None:
    check_positive(args, "repeats", "threads")
    if args.new_tokens < 2:
        raise UsageError(f"--new-tokens must be at least 2 (decode speed is measured past the first), got {args.new_tokens}")
    if min(args.prefill + args.decode_prompts + args.batches, default=1) < 1:
        raise UsageError("--prefill, --decode-prompts and --batches take positive numbers")
    if not args.prefill and not args.decode_prompts:
        raise UsageError("nothing to measure: give --prefill or --decode-prompts lengths")
    check_json_path(args.json)


def prefill_attentions(masked: bool, dtype: str) -> dict:
    """Prefill variant -> the attention function it runs: qsjax's; the old masked one (the baseline);
    on a GPU in bfloat16, also qsjax's without cuDNN (XLA's blockwise loops)."""
    import jax

    from qsjax.dense.attention import attention, attention_xla

    out = {"qsjax": attention}
    if masked:
        out["qsjax_masked_attention"] = masked_attention
    if jax.default_backend() == "gpu" and dtype == "bfloat16":
        out["qsjax_xla_attention"] = attention_xla
    return out


def qsjax_runs(model, cases, new_tokens: int, attentions: dict) -> tuple[dict, dict]:
    """(case, variant) -> run() returning arrays; and the compile seconds of each."""
    import jax
    import jax.numpy as jnp

    from qsjax.dense import blocks, model as dense
    from qsjax.runtime.buckets import round_up
    from qsjax.dense.sampler import Sampling, generate

    runs, compile_s = {}, {}
    for case, tokens in cases.items():
        B, P = tokens.shape
        start = jnp.zeros(B, jnp.int32)
        if case.startswith("prefill"):
            # one function object per variant: jax.jit caches traces by function, so a shared one
            # would hand the second variant the first one's trace, whatever `blocks.attention` is then
            prefill = lambda: lambda s, t, st, P=P: dense.prefill(model.module(s), t, st, P + 128)
            variants = {name: prefill() for name in attentions}
        else:
            def f(s, t, st, n):
                return generate(model.module(s), t, st, jax.random.key(0), (1.0, 1.0), max_new=n,
                                cache_length=round_up(P + new_tokens, 128), sampling=Sampling(), eos_ids=(), pad_id=0)[0]
            variants = {"qsjax": lambda s, t, st: f(s, t, st, new_tokens), "qsjax_first": lambda s, t, st: f(s, t, st, 1)}
        for name, fn in variants.items():
            t0 = time.perf_counter()
            with mock.patch.object(blocks, "attention", attentions.get(name, attentions["qsjax"])):  # decode: qsjax's
                compiled = jax.jit(fn).lower(model.state, jnp.asarray(tokens), start).compile()
            compile_s[(case, name)] = time.perf_counter() - t0
            log(f"compiled {case} {name}: {compile_s[(case, name)]:.1f} s")
            runs[(case, name)] = lambda c=compiled, t=jnp.asarray(tokens), st=start: jax.block_until_ready(c(model.state, t, st))
    return runs, compile_s


def hf_runs(hf, cases, new_tokens: int) -> dict:
    import torch

    runs = {}
    for case, tokens in cases.items():
        ids = torch.from_numpy(tokens.astype(np.int64)).to(hf.device)
        if case.startswith("prefill"):
            runs[(case, "hf")] = lambda ids=ids: hf(ids, use_cache=True, logits_to_keep=1)
        else:
            for name, n in (("hf", new_tokens), ("hf_first", 1)):
                runs[(case, name)] = lambda ids=ids, n=n: hf.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    eos_token_id=None, pad_token_id=0)
    return {key: (lambda f=f: torch_run(f)) for key, f in runs.items()}


def measure(runs: dict, repeats: int) -> dict:
    """Warm every run up once, then `repeats` rounds, every case's variants rotated.  -> medians"""
    for key, run in runs.items():
        run()
        log(f"warmed up {key[0]} {key[1]}")
    times = {key: [] for key in runs}
    cases = list(dict.fromkeys(case for case, _ in runs))
    for r in range(repeats):
        for case in cases:
            for key in rotated([k for k in runs if k[0] == case], r):
                t0 = time.perf_counter()
                runs[key]()
                times[key].append(time.perf_counter() - t0)
        log(f"repeat {r + 1}/{repeats} done")
    return {key: (median(ts), ts) for key, ts in times.items()}


def summarize(med: dict, compile_s: dict, cases: dict, new_tokens: int) -> dict:
    out = {"prefill": {}, "decode": {}}
    for case, tokens in cases.items():
        B, P = tokens.shape
        names = sorted({v for c, v in med if c == case})
        if case.startswith("prefill"):
            entry = {v: {"seconds": med[(case, v)][0], "seconds_all": med[(case, v)][1],
                         "tokens_per_second": P / med[(case, v)][0], "seconds_compile": compile_s.get((case, v))}
                     for v in names}
            for e in entry.values():
                e["speedup_vs_hf"] = ratio(entry.get("hf", {}).get("seconds"), e["seconds"])
                e["speedup_vs_masked_attention"] = ratio(entry.get("qsjax_masked_attention", {}).get("seconds"), e["seconds"])
                e["speedup_vs_xla_attention"] = ratio(entry.get("qsjax_xla_attention", {}).get("seconds"), e["seconds"])
            out["prefill"][str(P)] = entry
        else:
            entry = {}
            for v in (n for n in names if not n.endswith("_first")):
                full, first = med[(case, v)][0], med[(case, f"{v}_first")][0]
                entry[v] = {"seconds": full, "first_token_seconds": first, "tokens_per_second": B * new_tokens / full,
                            "decode_tokens_per_second": B * (new_tokens - 1) / (full - first) if full > first else None,
                            "seconds_compile": compile_s.get((case, v))}
            for e in entry.values():
                e["decode_speedup_vs_hf"] = ratio(e["decode_tokens_per_second"], entry.get("hf", {}).get("decode_tokens_per_second"))
            out["decode"][f"batch_{B}_prompt_{P}"] = entry
    return out


def format_table(report: dict) -> str:
    lines = [f"{'prefill':>8} {'variant':24} {'seconds':>9} {'tok/s':>9} {'vs hf':>7} {'vs masked':>10}"]
    for P, entry in report["prefill"].items():
        for v, e in entry.items():
            lines.append(f"{P:>8} {v:24} {e['seconds']:9.3f} {e['tokens_per_second']:9.1f} "
                         f"{fmt(e['speedup_vs_hf'], '7.2f')} {fmt(e['speedup_vs_masked_attention'], '10.2f')}")
    lines.append(f"{'decode':>16} {'variant':8} {'tok/s':>9} {'decode tok/s':>13} {'vs hf':>7}")
    for case, entry in report["decode"].items():
        for v, e in entry.items():
            lines.append(f"{case:>16} {v:8} {e['tokens_per_second']:9.1f} {fmt(e['decode_tokens_per_second'], '13.1f')} "
                         f"{fmt(e['decode_speedup_vs_hf'], '7.2f')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    from qsjax.evaluation.data import read_text, resolve_data, tokenize
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.checkpoints.tokenizer import load_tokenizer
    from qsjax.weights import resolve_model

    model_dir = resolve_model(None)
    model, tokenizer = load_model(model_dir, args.dtype), load_tokenizer(model_dir)
    longest = max(args.prefill + [p + args.new_tokens for p in args.decode_prompts])
    if longest > model.cfg.max_positions:
        raise UsageError(f"{longest} tokens do not fit the model's context ({model.cfg.max_positions})")
    stream = tokenize(tokenizer, read_text(resolve_data("wikitext103"))).astype(np.int32)
    cases = {f"prefill_{P}": stream[None, :P] for P in args.prefill}
    for P in args.decode_prompts:
        for B in args.batches:
            cases[f"decode_{B}x{P}"] = np.stack([stream[i * P:(i + 1) * P] for i in range(B)])
    runs, compile_s = qsjax_runs(model, cases, args.new_tokens, prefill_attentions(not args.skip_masked, args.dtype))
    if not args.skip_hf:
        import torch

        hf = load_hf(model_dir, args.threads)
        if args.dtype == "bfloat16":
            hf = hf.to(torch.bfloat16)
        runs.update(hf_runs(hf, cases, args.new_tokens))
    med = measure(runs, args.repeats)
    report = {"command": " ".join(["python", "scripts/bench_dense.py", *(sys.argv[1:] if argv is None else argv)]),
              "model": model_dir.name, "dtype": args.dtype, "machine_at_start": machine(), "repeats": args.repeats,
              "torch_threads": args.threads, "new_tokens": args.new_tokens,
              **summarize(med, compile_s, cases, args.new_tokens)}
    report["load_average_at_end"] = machine()["load_average"]
    return write_report(args.json, report, format_table(report))


if __name__ == "__main__":
    run_cli(main)
