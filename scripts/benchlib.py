"""What the benchmarks share: argument checks, interleaved timing, medians and ratios, the machine
they ran on, the JSON report, and transformers (PyTorch) as the reference, driven by qsjax's own
evaluation loop.

Each benchmark interleaves its variants within every repeat (the order rotated from repeat to
repeat), reports medians with compilation apart, and writes ratios measured in the same run: on a
shared 2-core machine only ratios mean something."""

from __future__ import annotations

import inspect
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from qsjax.runtime.cli import UsageError, check_output_file, write_results

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
BANDWIDTH_BYTES = 1 << 30  # the array read_bandwidth sums


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rotated(names, r: int) -> list:
    """The run order of repeat r: the variants rotated by r places."""
    names = list(names)
    k = r % len(names)
    return names[k:] + names[:k]


def median(xs):
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def fmt(x, spec: str) -> str:
    """x formatted by spec, or "-" at the same width when there is no value (the width: the digits
    after any sign option, e.g. 9 in "9.2f" and "+9.3f")."""
    if x is not None:
        return format(x, spec)
    width = spec.lstrip("+- ").split(".")[0]
    return "-".rjust(int(width) if width.isdigit() else 0)


def timed(fn, repeats: int) -> float:
    """Median wall-clock seconds of fn() over `repeats` calls, after one untimed call (compile, warm-up)."""
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return median(times)


def check_positive(args, *names: str, minimum: int = 1) -> None:
    for name in names:
        value = getattr(args, name)
        if value < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


def check_strided(args) -> None:
    """--max-length and --stride of the strided protocol: windows of at least 2 tokens, each scoring
    1..--max-length of them."""
    check_positive(args, "max_length", minimum=2)
    if not 0 < args.stride <= args.max_length:
        raise UsageError(f"--stride must be in 1..--max-length ({args.max_length}), got {args.stride}")


PROTOCOLS = ("strided", "tail")


def add_protocol(p, max_length: int = 2048, stride: int = 512, max_eval_tokens: int = 4096) -> None:
    """--protocol, --max-length, --stride and --max-eval-tokens of a perplexity benchmark."""
    p.add_argument("--protocol", choices=PROTOCOLS, default="strided",
                   help="strided (each token scored once, contexts growing to --max-length) or tail (windows "
                        "of --max-length ending every --stride tokens, each scoring its last --stride)")
    p.add_argument("--max-length", type=int, default=max_length, help=f"windows' length (default {max_length})")
    p.add_argument("--stride", type=int, default=stride, help=f"windows' stride (default {stride})")
    p.add_argument("--max-eval-tokens", type=int, default=max_eval_tokens,
                   help=f"the first N tokens of the data (default {max_eval_tokens})")


def check_protocol(args) -> None:
    """The windows `add_protocol` describes: the tail protocol needs stride < max length <= tokens."""
    check_strided(args)
    check_positive(args, "max_eval_tokens", minimum=2)
    if args.protocol == "tail" and not (args.stride < args.max_length <= args.max_eval_tokens):
        raise UsageError(f"--protocol tail needs --stride < --max-length <= --max-eval-tokens "
                         f"(got {args.stride}, {args.max_length}, {args.max_eval_tokens})")


def windows_of(args, n_tokens: int) -> list:
    """The windows of `args.protocol` over a stream of n_tokens (`qsjax.evaluation.perplexity`)."""
    from qsjax.evaluation.perplexity import strided_windows, tail_windows

    if args.protocol == "tail":
        if n_tokens < args.max_length:
            raise UsageError(f"--protocol tail: the data has {n_tokens} tokens, fewer than --max-length {args.max_length}")
        return tail_windows(n_tokens, args.max_length, args.stride)
    return strided_windows(n_tokens, args.max_length, args.stride)


def protocol_report(args, n_tokens: int) -> dict:
    return {"name": args.protocol, "max_length": args.max_length, "stride": args.stride,
            "max_eval_tokens": args.max_eval_tokens, "tokens": int(n_tokens)}


def check_json_path(path: str | None) -> None:
    """Refuse a --json location that cannot be written, before any work (qsjax.runtime.cli.check_output_file)."""
    if path is not None:
        check_output_file("--json", path)


def machine() -> dict:
    """The machine and library versions a report was measured with."""
    import jax

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    versions = {"jax": jax.__version__}
    for name in ("torch", "transformers"):
        if name in sys.modules:
            versions[name] = sys.modules[name].__version__
    device = jax.devices()[0]
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_flags": {f: f in flags for f in CPU_FLAGS}, "device": str(device),
            "device_kind": device.device_kind, "load_average": os.getloadavg(), "versions": versions}


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


def write_report(path: str | None, report: dict, table: str) -> int:
    """The table to stdout (stderr with -), then the JSON report to `path` (- for stdout), written
    even when stdout fails -> the exit status (qsjax.runtime.cli.write_results)."""
    import json

    return write_results(table, [("--json", path, json.dumps(report, indent=2) + "\n")] if path is not None else [])


def load_hf(model_dir: Path, threads: int):
    """transformers' LlamaForCausalLM from the GGUF in the default model's folder, float32, `threads`
    threads; on the GPU when PyTorch sees one, with TF32 float32 matmuls there as XLA's default has."""
    import torch
    from transformers import AutoModelForCausalLM

    from qsjax.weights import gguf_path

    gguf = gguf_path(model_dir)
    if gguf is None:
        raise UsageError(f"{model_dir} holds no GGUF file for transformers to load; use --skip-hf")
    torch.set_num_threads(threads)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf.name, dtype=torch.float32).eval()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        hf = hf.to("cuda")
    return hf


def torch_run(f):
    """f() under inference mode, waiting for the GPU's queued work (so that wall-clock times hold)."""
    import torch

    with torch.inference_mode():
        out = f()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


class HFScorer:
    """transformers' dense NLL with the interface of `qsjax.evaluation.perplexity.Scorer`, so that the same
    `perplexity.evaluate` loop drives it (batch 1: one window per forward, no padding). The LM head
    runs on the scored positions only (`logits_to_keep`) unless `all_logits`; NLL in float32."""

    def __init__(self, hf, cfg, all_logits: bool = False):
        self.hf = hf
        self.model = type("Model", (), {"cfg": cfg})
        takes = "logits_to_keep" in inspect.signature(hf.forward).parameters
        self.scored_only = takes and not all_logits
        self.lm_head = "scored only" if self.scored_only else "all positions"

    def compile(self, batch: int, length: int, offset: int) -> float:
        if batch != 1:
            raise ValueError("HFScorer scores one window at a time")
        return 0.0

    def score(self, tokens: np.ndarray, lengths: np.ndarray, offset: int):
        """tokens [1, T] -> nll [1, T - 1 - offset] (NumPy float32), None"""
        import torch

        T = int(lengths[0])
        ids = torch.from_numpy(tokens[:, :T].astype(np.int64)).to(self.hf.device)
        with torch.inference_mode():
            if self.scored_only:
                z = self.hf(ids, use_cache=False, logits_to_keep=torch.arange(offset, T - 1)).logits[0]
            else:
                z = self.hf(ids, use_cache=False).logits[0, offset:T - 1]
            z = z.float()
            nll = torch.logsumexp(z, dim=-1) - z.gather(-1, ids[0, offset + 1:, None])[:, 0]
        out = np.full((1, tokens.shape[1] - 1 - offset), np.nan, np.float32)
        out[0, : len(nll)] = nll.cpu().numpy()
        return out, None


def masked_attention(q, k, v, q_slot, k_slot, k_ok, bias=None, *, self_visible=False, window=None, rule=None):
    """The attention qsjax used before `qsjax.dense.attention` (the baseline of the attention benchmarks):
    a stored [B, T, S] mask and, for a square window, blocks of 128 queries each scoring the keys up
    to its end with a full score tensor (masked scores set to the most negative float). It predates
    local attention and per-layer rules: the dense model of the benchmarks (SmolLM2, a plain Llama)
    passes `window=None` and the plain rule, anything else is refused."""
    import jax
    import jax.numpy as jnp

    from qsjax.dense.layers import grouped_scores

    from qsjax.dense.attention import PLAIN

    if window is not None or rule not in (None, PLAIN):
        raise ValueError("the masked-attention baseline has no local attention, soft-capping or sliding window")
    mask = (k_slot[:, None, :] <= q_slot[:, :, None]) & (
        k_ok[:, None, :] | (self_visible & (k_slot[:, None, :] == q_slot[:, :, None])))

    def attend(q, k, v, mask, bias):
        B, T, H, Dh = q.shape
        scores = grouped_scores(q, k)  # [B, K, G, T, S]
        if bias is not None:
            scores = scores + bias[:, None, None, None, :]
        probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min), axis=-1)
        return jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v).reshape(B, T, H, Dh)

    T, S = q.shape[1], k.shape[1]
    if T != S or T <= 128:
        return attend(q, k, v, mask, bias)
    outs = [attend(q[:, s:s + 128], k[:, :s + 128], v[:, :s + 128], mask[:, s:s + 128, :s + 128],
                   None if bias is None else bias[:, :s + 128]) for s in range(0, T, 128)]
    return jnp.concatenate(outs, axis=1)
