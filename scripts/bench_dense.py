"""Dense speed, qsjax vs Hugging Face transformers (PyTorch), same random weights, same CPU.

    python scripts/bench_dense.py --json bench_dense.json

For a GPT-2-small-shaped and a SmolLM2-135M-shaped model (random weights, float32, batch 1):
prefill tokens/s for 512 and 1024 prompt tokens (both frameworks return the last position's
logits and a filled KV cache: transformers with `logits_to_keep=1`, as its `generate` does), and
decode tokens/s for 128 new greedy tokens after a 16-token prompt (transformers `generate`; qsjax's
compiled generation loop). Variants are interleaved within each repeat; medians are reported and
compile seconds are reported separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {
    "gpt2-small": dict(model_type="gpt2", vocab_size=50257, n_positions=2048, n_embd=768, n_layer=12, n_head=12),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
}


def hf_model(spec: dict):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    spec = dict(spec)
    kind = spec.pop("model_type")
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(**spec))
    else:
        model = LlamaForCausalLM(LlamaConfig(**spec))
    return model.eval()


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_shape(name: str, spec: dict, repeats: int, prefill_lengths, new_tokens: int) -> dict:
    import torch

    from qsjax.params import load_model
    from qsjax.sampler import Sampling, generate

    hf = hf_model(spec)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, safe_serialization=True)
        model = load_model(d)
    vocab = model.cfg.vocab_size
    rng = np.random.default_rng(0)
    prompts = {T: rng.integers(0, vocab, (1, T)) for T in prefill_lengths}
    short = rng.integers(0, vocab, (1, 16))

    # qsjax programs, compiled up front (compile time reported separately)
    compile_s = {}
    prefill_fns = {}
    for T in prefill_lengths:
        t0 = time.perf_counter()
        prefill_fns[T] = model._prefill.lower(model.state, jnp.asarray(prompts[T], jnp.int32), jnp.zeros(1, jnp.int32), T + 128).compile()
        compile_s[f"prefill_{T}"] = time.perf_counter() - t0
    run = jax.jit(lambda state, t: generate(model.module(state), t, jnp.zeros(1, jnp.int32), jax.random.key(0),
                                            (1.0, 1.0), max_new=new_tokens, cache_length=16 + new_tokens,
                                            sampling=Sampling(), eos_ids=(), pad_id=0))
    t0 = time.perf_counter()
    gen_fn = run.lower(model.state, jnp.asarray(short, jnp.int32)).compile()
    compile_s["generate"] = time.perf_counter() - t0

    def qs_prefill(T):
        logits, cache = prefill_fns[T](model.state, jnp.asarray(prompts[T], jnp.int32), jnp.zeros(1, jnp.int32))
        jax.block_until_ready((logits, cache))

    def qs_decode():
        out, steps, _ = gen_fn(model.state, jnp.asarray(short, jnp.int32))
        assert int(steps) == new_tokens
        np.asarray(out)

    @torch.inference_mode()
    def hf_prefill(T):
        hf(torch.tensor(prompts[T]), use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def hf_decode():
        out = hf.generate(torch.tensor(short), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)
        assert out.shape[1] == 16 + new_tokens

    # one warm-up of each, then interleaved repeats
    for T in prefill_lengths:
        qs_prefill(T), hf_prefill(T)
    qs_decode(), hf_decode()
    times: dict[str, list[float]] = {}
    for r in range(repeats):
        for T in prefill_lengths:
            times.setdefault(f"qsjax_prefill_{T}", []).append(timed(lambda: qs_prefill(T)))
            times.setdefault(f"hf_prefill_{T}", []).append(timed(lambda: hf_prefill(T)))
        times.setdefault("qsjax_decode", []).append(timed(qs_decode))
        times.setdefault("hf_decode", []).append(timed(hf_decode))
        print(f"  {name}: repeat {r + 1}/{repeats} done", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"compile_seconds": compile_s, "median_seconds": med, "all_seconds": times}
    for T in prefill_lengths:
        result[f"prefill_{T}_tokens_per_second"] = {"qsjax": T / med[f"qsjax_prefill_{T}"], "hf": T / med[f"hf_prefill_{T}"]}
        result[f"prefill_{T}_ratio"] = med[f"hf_prefill_{T}"] / med[f"qsjax_prefill_{T}"]
    result["decode_tokens_per_second"] = {"qsjax": new_tokens / med["qsjax_decode"], "hf": new_tokens / med["hf_decode"]}
    result["decode_ratio"] = med["hf_decode"] / med["qsjax_decode"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write results to this file ('-' for stdout)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    args = p.parse_args(argv)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    report = {
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "device": str(jax.devices()[0]), "torch_threads": args.threads, "dtype": "float32", "batch": 1,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "shapes": {},
    }
    for name in args.shapes:
        print(f"benchmarking {name} ...", file=sys.stderr)
        report["shapes"][name] = bench_shape(name, SHAPES[name], args.repeats, args.prefill, args.new_tokens)
    print(f"{'shape':14} {'metric':22} {'qsjax':>10} {'hf':>10} {'ratio':>7}", file=sys.stderr)
    for name, r in report["shapes"].items():
        for T in args.prefill:
            tps = r[f"prefill_{T}_tokens_per_second"]
            print(f"{name:14} {f'prefill {T} tok/s':22} {tps['qsjax']:10.1f} {tps['hf']:10.1f} {r[f'prefill_{T}_ratio']:7.2f}", file=sys.stderr)
        tps = r["decode_tokens_per_second"]
        print(f"{name:14} {'decode tok/s':22} {tps['qsjax']:10.1f} {tps['hf']:10.1f} {r['decode_ratio']:7.2f}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.json == "-":
        print(text)
    elif args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
