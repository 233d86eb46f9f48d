"""Generation on the real default model: qsjax vs Hugging Face transformers `generate`, same prompt.

    python scripts/bench_generate.py --json bench_generate.json

Loads SmolLM2-135M-Instruct in qsjax (float32) and in transformers (the same GGUF, float32), runs
greedy generation of --new-tokens tokens for the same prompt in both (interleaved, median of
--repeats), and reports the texts, tokens/s, and time to first token (the prompt's prefill plus one
token). With --quicksilver PRESET, qsjax also runs with that preset (default: fast), side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

DEFAULT_PROMPT = "The history of the printing press begins"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--prompt-repeat", type=int, default=1, help="repeat the prompt text this many times (long prompts)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quicksilver", default="fast", choices=["off", "paper", "fast"])
    p.add_argument("--json")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from qsjax.generate import Generator
    from qsjax.params import load_model
    from qsjax.quicksilver.config import preset
    from qsjax.tokenizer import load_tokenizer
    from qsjax.weights import gguf_path, resolve_model

    torch.set_num_threads(args.threads)
    model_dir = resolve_model(None)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    prompt = " ".join([args.prompt] * args.prompt_repeat)
    ids = tokenizer.encode(prompt)
    gens = {"qsjax": Generator(model, tokenizer)}
    if args.quicksilver != "off":
        gens[f"qsjax_{args.quicksilver}"] = Generator(model, tokenizer, preset(args.quicksilver, model.cfg.n_layers))
    gguf = gguf_path(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf.name, dtype=torch.float32).eval()
    n = args.new_tokens

    def run_hf(max_new):
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                              eos_token_id=None, pad_token_id=2)
        return out[0, len(ids):].tolist()

    compile_s = {}
    for name, g in gens.items():  # compile both programs (n tokens, and 1 token for time to first token)
        g.eos_ids = ()  # generate exactly n tokens, like min_new_tokens in transformers
        compile_s[name] = g([ids], max_new_tokens=n).seconds_compile + g([ids], max_new_tokens=1).seconds_compile
    run_hf(2)
    times: dict[str, list[float]] = {}
    texts = {}
    for r in range(args.repeats):
        for name, g in gens.items():
            res = g([ids], max_new_tokens=n)
            times.setdefault(f"{name}_generate", []).append(res.seconds)
            texts[name] = res.texts[0]
            times.setdefault(f"{name}_first_token", []).append(g([ids], max_new_tokens=1).seconds)
        t0 = time.perf_counter()
        out = run_hf(n)
        times.setdefault("hf_generate", []).append(time.perf_counter() - t0)
        texts["hf"] = tokenizer.decode(out)
        t0 = time.perf_counter()
        run_hf(1)
        times.setdefault("hf_first_token", []).append(time.perf_counter() - t0)
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "prompt_tokens": len(ids), "new_tokens": n, "repeats": args.repeats, "torch_threads": args.threads,
        "compile_seconds": compile_s, "median_seconds": med, "texts": texts,
        "tokens_per_second": {k.removesuffix("_generate"): n / v for k, v in med.items() if k.endswith("_generate")},
        "time_to_first_token": {k.removesuffix("_first_token"): v for k, v in med.items() if k.endswith("_first_token")},
    }
    report["ratio_vs_hf"] = {k: med["hf_generate"] / med[f"{k}_generate"] for k in gens}
    report["ttft_ratio_vs_dense_qsjax"] = {k: med["qsjax_first_token"] / med[f"{k}_first_token"] for k in gens}
    for k, v in report["tokens_per_second"].items():
        print(f"{k:14} {v:7.1f} tokens/s   first token {report['time_to_first_token'][k]:.3f} s", file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
