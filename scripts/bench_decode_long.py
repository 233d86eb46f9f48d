"""Single-token decode after a long prompt: dense qsjax against transformers `generate`, and the
step's time against the bytes it must read at the machine's measured read bandwidth.

    python scripts/bench_decode_long.py --json docs/results/dense-speed/bench_decode_long.json

For each of --lengths (default 16, 4,096 and 8,128 tokens: 8,128 + 64 new tokens fill SmolLM2's
8,192-token context), the last that many tokens of the shipped C4 validation sample (held out: the
tail, which nothing in qsjax is tuned on) at batch 1, greedy, EOS ignored, --new-tokens new tokens.
The decode step's time is the decode part of the call over its steps: qsjax's Generator times its
decode loop apart (new tokens - 1 steps, the tokens' transfer included); for transformers a logits
processor stamps the clock each time `generate` picks a token, and the step is the time from the
first stamp (after the prefill) to the last over the steps between. Prefill is not timed.

Bytes a step must read: every weight once (the LM head reads the whole tied embedding) and the whole
KV cache qsjax holds (keys, values and slots of every place, filled or not), in float32. Read
bandwidth: a jitted sum over a 1 GiB float32 array (XLA's threads, 2 on the project's machine), and
NumPy's sum (one thread), measured in every repeat beside the variants. Each repeat runs every length
and variant, the order rotated; medians, compile time apart, ratios from the same run.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchlib import check_json_path, check_positive, fmt, load_hf, log, machine, median, ratio, rotated, write_report
from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli

BANDWIDTH_BYTES = 1 << 30


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/bench_decode_long.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE (- for stdout)")
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 4096, 8128],
                   help="prompt lengths in tokens (default 16 4096 8128)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; medians are reported (default 5)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (default 2)")
    p.add_argument("--skip-hf", action="store_true", help="leave out transformers")
    return p.parse_args(argv)


def check_args(args) -> None:
    check_positive(args, "repeats", "threads")
    if min(args.lengths) < 1:
        raise UsageError(f"--lengths takes positive numbers, got {min(args.lengths)}")
    if args.new_tokens < 2:
        raise UsageError(f"--new-tokens must be at least 2 (a decode step follows the first), got {args.new_tokens}")
    check_json_path(args.json)


def read_bandwidth() -> dict:
    """Bytes per second of a plain sum over BANDWIDTH_BYTES of float32: jitted (XLA's threads) and
    NumPy's (one thread), each the best of 3 after a warm-up."""
    import jax
    import jax.numpy as jnp

    n = BANDWIDTH_BYTES // 4
    a = jnp.ones(n, jnp.float32)
    total = jax.jit(jnp.sum)
    b = np.ones(n, np.float32)

    def best(f):
        f()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return BANDWIDTH_BYTES / min(times)

    return {"jax": best(lambda: total(a).block_until_ready()), "numpy": best(lambda: b.sum())}


class Stamps:
    """A transformers logits processor that records the clock each time `generate` picks a token."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_run(hf, prompt: list[int], n: int):
    """-> (seconds per decode step, new token ids) of transformers' greedy `generate`."""
    import torch
    from transformers import LogitsProcessorList

    from benchlib import torch_run

    ids = torch.tensor([prompt], dtype=torch.int64, device=hf.device)
    stamps = Stamps()
    out = torch_run(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                        do_sample=False, eos_token_id=None, pad_token_id=0,
                                        logits_processor=LogitsProcessorList([stamps])))
    steps = len(stamps.times) - 1
    return (stamps.times[-1] - stamps.times[0]) / steps, out[0, len(prompt):].tolist()


def step_bytes(gen, length: int, n: int) -> dict:
    """What a decode step must read: the weights (each once) and the cache qsjax holds for this prompt."""
    import jax

    from qsjax.dense.kvcache import dense_cache_bytes
    from qsjax.runtime.buckets import cache_slots, prompt_bucket

    weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(gen.model.state))
    places = cache_slots(prompt_bucket(length, gen.model.cfg.max_positions), n)
    cache = dense_cache_bytes(gen.model.cfg, 1, places, gen.kv_dtype)
    return {"weights": weights, "cache": cache, "cache_places": places, "total": weights + cache}


def bench(gen, hf, stream, args) -> dict:
    """Every length and variant per repeat (order rotated), with the read bandwidth measured beside."""
    N = args.new_tokens
    prompts = {P: stream[len(stream) - P:].tolist() for P in args.lengths}
    names = ["qsjax"] + (["transformers"] if hf is not None else [])

    def run(name, P):
        """-> (seconds per decode step, seconds compiling, new token ids)"""
        if name == "transformers":
            step, ids = hf_run(hf, prompts[P], N)
            return step, 0.0, ids
        res = gen([prompts[P]], max_new_tokens=N)
        return res.seconds_decode / (N - 1), res.seconds_compile, res.token_ids[0]

    steps = {(P, v): [] for P in args.lengths for v in names}
    compile_s, tokens, bandwidth = {}, {}, {"jax": [], "numpy": []}
    for P in args.lengths:
        for v in names:
            _, compile_s[(P, v)], tokens[(P, v)] = run(v, P)
        log(f"[decode_long] {P} tokens: compiled and warmed up")
    for r in range(args.repeats):
        for key, value in read_bandwidth().items():
            bandwidth[key].append(value)
        for P in args.lengths:
            for v in rotated(names, r):
                s, _, tokens[(P, v)] = run(v, P)
                steps[(P, v)].append(s)
        log(f"[decode_long] repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{P}: " + " ".join(f"{v} {steps[(P, v)][-1] * 1e3:.1f} ms" for v in names) for P in args.lengths))

    bw = median(bandwidth["jax"])
    out = {}
    for P in args.lengths:
        need = step_bytes(gen, P, N)
        entry = {"bytes_per_step": need, "bytes_seconds": need["total"] / bw}
        for v in names:
            s = median(steps[(P, v)])
            entry[v] = {"step_seconds": s, "step_seconds_all": steps[(P, v)], "tokens_per_second": 1 / s,
                        "seconds_compile": compile_s[(P, v)], "step_over_bytes_time": s / entry["bytes_seconds"]}
        if hf is not None:
            entry["qsjax_speedup_vs_transformers"] = ratio(entry["transformers"]["step_seconds"],
                                                           entry["qsjax"]["step_seconds"])
            a, b = tokens[(P, "qsjax")], tokens[(P, "transformers")]
            entry["tokens_equal_transformers"] = a == b
            entry["first_difference"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        out[f"prompt_{P}"] = entry
    return {"lengths": args.lengths, "new_tokens": N, "steps_timed": N - 1,
            "read_bandwidth": {"bytes_per_second": bw, "bytes_per_second_all": bandwidth["jax"],
                               "numpy_bytes_per_second": median(bandwidth["numpy"]),
                               "numpy_bytes_per_second_all": bandwidth["numpy"],
                               "array_bytes": BANDWIDTH_BYTES},
            "decode": out}


def format_table(g: dict) -> str:
    bw = g["read_bandwidth"]
    lines = [f"decode step after a long prompt, {g['new_tokens']} new tokens; read bandwidth "
             f"{bw['bytes_per_second'] / 1e9:.1f} GB/s (jax sum), {bw['numpy_bytes_per_second'] / 1e9:.1f} GB/s (numpy)",
             f"  {'prompt':>7} {'MB/step':>8} {'bytes ms':>9} {'qsjax ms':>9} {'x bytes':>8} {'hf ms':>8} "
             f"{'x bytes':>8} {'qsjax/hf':>9} {'same':>5}"]
    for P in g["lengths"]:
        e = g["decode"][f"prompt_{P}"]
        q, h = e["qsjax"], e.get("transformers")
        lines.append(f"  {P:7d} {e['bytes_per_step']['total'] / 1e6:8.0f} {e['bytes_seconds'] * 1e3:9.1f} "
                     f"{q['step_seconds'] * 1e3:9.1f} {q['step_over_bytes_time']:8.2f} "
                     f"{fmt(h and h['step_seconds'] * 1e3, '8.1f')} {fmt(h and h['step_over_bytes_time'], '8.2f')} "
                     f"{fmt(e.get('qsjax_speedup_vs_transformers'), '9.2f')} {str(e.get('tokens_equal_transformers', '-')):>5}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.checkpoints.tokenizer import load_tokenizer
    from qsjax.evaluation.data import read_text, resolve_data, tokenize
    from qsjax.runtime.generator import Generator
    from qsjax.weights import resolve_model

    model_dir = resolve_model(None)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    context = model.cfg.max_positions
    if max(args.lengths) + args.new_tokens > context:
        raise UsageError(f"the longest prompt ({max(args.lengths)}) and --new-tokens ({args.new_tokens}) must fit "
                         f"the model's context ({context} positions)")
    stream = tokenize(tokenizer, read_text(resolve_data("c4")))
    gen = Generator(model, tokenizer)
    gen.eos_ids = ()  # exactly the tokens asked for, like min_new_tokens in transformers
    hf = None if args.skip_hf else load_hf(model_dir, args.threads)
    report = {"command": " ".join(["python", "scripts/bench_decode_long.py", *(sys.argv[1:] if argv is None else argv)]),
              "model": model_dir.name, "dtype": "float32", "data": "c4 validation sample, the last tokens",
              "machine_at_start": machine(), "repeats": args.repeats, "torch_threads": args.threads,
              **bench(gen, hf, stream, args)}
    report["load_average_at_end"] = machine()["load_average"]
    return write_report(args.json, report, format_table(report))


if __name__ == "__main__":
    run_cli(main)
