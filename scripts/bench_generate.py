"""Generation on the real default model: dense qsjax, a QuickSilver preset and transformers
`generate`, time to first token and decode speed, in one run.

    python scripts/bench_generate.py --json bench_generate.json

Greedy, EOS ignored so every row makes exactly the tokens asked for (transformers: min_new_tokens).
Time to first token for a --prompt-tokens prompt (default 2,048 tokens of WikiText-103 test), and
decode speed for --new-tokens new tokens (default 128) at batch 1 and 8 after --decode-prompt-tokens
prompt tokens (consecutive slices of WikiText-103 test, all the same length, so left padding never
applies). `tokens_per_second` is batch x new tokens over the whole call (prefill included);
`decode_tokens_per_second` is batch x (new tokens - 1) over the call minus a one-token call on the
same prompts. Every case is compiled and warmed up first; then each repeat runs every case and
variant, the order rotated; medians are reported with ratios from the same run.
"""

from __future__ import annotations

import dataclasses

import sys
import time

from benchlib import (check_json_path, check_positive, fmt, load_hf, log, machine, median, ratio, rotated, torch_run,
                      write_report)
from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli

DECODE_BATCHES = (1, 8)


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/bench_generate.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE (- for stdout)")
    p.add_argument("--quicksilver", default="fast", choices=["off", "paper", "fast"], help="preset run beside dense (default fast)")
    p.add_argument("--prompt-tokens", type=int, default=2048, help="time-to-first-token prompt length (default 2048)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode: new tokens per row (default 128)")
    p.add_argument("--decode-prompt-tokens", type=int, default=128, help="decode: prompt length (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported (default 3)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (default 2)")
    p.add_argument("--skip-hf", action="store_true", help="leave out transformers")
    return p.parse_args(argv)


def check_args(args) -> None:
    check_positive(args, "prompt_tokens", "decode_prompt_tokens", "repeats", "threads")
    if args.new_tokens < 2:
        raise UsageError(f"--new-tokens must be at least 2 (decode speed is measured past the first), got {args.new_tokens}")
    check_json_path(args.json)


def bench(gens: dict, hf_model, tokenizer, stream, args) -> dict:
    """Time to first token for one long prompt, and decode speed at batch 1 and 8, interleaved."""
    P, N = args.prompt_tokens, args.new_tokens
    long_prompt = [stream[:P].tolist()]
    decode_prompts = {b: [stream[i * args.decode_prompt_tokens:(i + 1) * args.decode_prompt_tokens].tolist()
                          for i in range(b)] for b in DECODE_BATCHES}
    cases = [("ttft", long_prompt, 1)]  # (measurement, prompts, new tokens)
    for b in DECODE_BATCHES:
        cases += [(f"batch_{b}_first", decode_prompts[b], 1), (f"batch_{b}_generate", decode_prompts[b], N)]

    def run(name, prompts, n):
        """-> (seconds, seconds_compile, new token ids)"""
        if name == "hf_dense":
            import torch

            ids = torch.tensor(prompts, device=hf_model.device)
            t0 = time.perf_counter()
            out = torch_run(lambda: hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                                      min_new_tokens=n, do_sample=False, eos_token_id=None,
                                                      pad_token_id=tokenizer.pad_id or 0))
            return time.perf_counter() - t0, 0.0, out[:, len(prompts[0]):].tolist()
        res = gens[name](prompts, max_new_tokens=n)
        assert all(len(t) == n for t in res.token_ids), [len(t) for t in res.token_ids]
        return res.seconds, res.seconds_compile, res.token_ids

    names = list(gens) + (["hf_dense"] if hf_model is not None else [])
    times = {(c, v): [] for c, _, _ in cases for v in names}
    compile_s, warm_s, tokens = {}, {}, {}
    for case, prompts, n in cases:
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
                if case == "batch_1_generate":
                    tokens[v] = out[0]
        log(f"[generate] repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{v} first token {times[('ttft', v)][-1]:.2f} s" for v in names))

    def cell(case, v):
        return {"seconds": median(times[(case, v)]), "seconds_all": times[(case, v)],
                "seconds_compile": compile_s[(case, v)], "seconds_warmup": warm_s[(case, v)]}

    ttft = {v: cell("ttft", v) for v in names}
    for e in ttft.values():
        e["speedup_vs_dense_qsjax"] = ratio(ttft["dense_qsjax"]["seconds"], e["seconds"])
        e["speedup_vs_hf"] = ratio(ttft["hf_dense"]["seconds"], e["seconds"]) if "hf_dense" in ttft else None
    decode = {}
    for b in DECODE_BATCHES:
        d = {}
        for v in names:
            full, first = cell(f"batch_{b}_generate", v), cell(f"batch_{b}_first", v)
            d[v] = {**full, "first_token_seconds": first["seconds"], "tokens_per_second": b * N / full["seconds"],
                    "decode_tokens_per_second": b * (N - 1) / (full["seconds"] - first["seconds"])
                    if full["seconds"] > first["seconds"] else None}
        for e in d.values():
            for key in ("tokens_per_second", "decode_tokens_per_second"):
                e[f"{key}_vs_dense_qsjax"] = ratio(e[key], d["dense_qsjax"][key])
                e[f"{key}_vs_hf"] = ratio(e[key], d["hf_dense"][key]) if "hf_dense" in d else None
        decode[f"batch_{b}"] = d
    return {"prompt_tokens": P, "new_tokens": N, "decode_prompt_tokens": args.decode_prompt_tokens,
            "decode_batches": list(DECODE_BATCHES), "time_to_first_token": ttft, "decode": decode,
            "batch_1_tokens_equal_dense_qsjax": {v: tokens[v] == tokens["dense_qsjax"] for v in names},
            "batch_1_texts": {v: tokenizer.decode(t) for v, t in tokens.items()}}


def format_table(g: dict) -> str:
    lines = [f"first token of a {g['prompt_tokens']}-token prompt; {g['new_tokens']} new tokens after "
             f"{g['decode_prompt_tokens']} prompt tokens",
             f"  {'variant':16} {'TTFT s':>8} {'vs dense':>9} " + " ".join(
                 f"{f'b{b} tok/s':>9} {f'b{b} dec/s':>9}" for b in g["decode_batches"])]
    for v, e in g["time_to_first_token"].items():
        cols = " ".join(f"{g['decode'][f'batch_{b}'][v]['tokens_per_second']:9.1f} "
                        f"{fmt(g['decode'][f'batch_{b}'][v]['decode_tokens_per_second'], '9.1f')}"
                        for b in g["decode_batches"])
        lines.append(f"  {v:16} {e['seconds']:8.3f} {fmt(e['speedup_vs_dense_qsjax'], '9.2f')} {cols}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    from qsjax.evaluation.data import read_text, resolve_data, tokenize
    from qsjax.runtime.generator import Generator
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.quicksilver.settings import preset
    from qsjax.checkpoints.tokenizer import load_tokenizer
    from qsjax.weights import resolve_model

    model_dir = resolve_model(None)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    cfg = model.cfg
    if args.prompt_tokens + 1 > cfg.max_positions or args.decode_prompt_tokens + args.new_tokens > cfg.max_positions:
        raise UsageError(f"the prompts and new tokens must fit the model's context ({cfg.max_positions} positions)")
    stream = tokenize(tokenizer, read_text(resolve_data("wikitext103")))
    needed = max(args.prompt_tokens, max(DECODE_BATCHES) * args.decode_prompt_tokens)
    if len(stream) < needed:
        raise UsageError(f"WikiText-103 test gives {len(stream)} tokens; the prompts need {needed}")
    gens = {"dense_qsjax": Generator(model, tokenizer)}
    if args.quicksilver != "off":
        gens[args.quicksilver] = Generator(model, tokenizer, preset(args.quicksilver, cfg.n_layers))
    for g in gens.values():
        g.eos_ids = ()  # exactly the tokens asked for, like min_new_tokens in transformers
    hf = None if args.skip_hf else load_hf(model_dir, args.threads)
    report = {"command": " ".join(["python", "scripts/bench_generate.py", *(sys.argv[1:] if argv is None else argv)]),
              "model": model_dir.name, "dtype": "float32", "machine_at_start": machine(), "repeats": args.repeats,
              "torch_threads": args.threads,
              "settings": {"quicksilver": None if args.quicksilver == "off" else
                           dataclasses.asdict(gens[args.quicksilver].quicksilver),
                           "quicksilver_preset": None if args.quicksilver == "off" else args.quicksilver},
              **bench(gens, hf, tokenizer, stream, args)}
    report["load_average_at_end"] = machine()["load_average"]
    return write_report(args.json, report, format_table(report))


if __name__ == "__main__":
    run_cli(main)
