"""What a generation run will hold in memory, estimated from the config before anything loads, and
the batch size that fits: a run that cannot fit even one prompt at a time is refused up front
instead of growing until the system kills it.

    need = estimate(cfg, "float32", longest_prompt=40, max_new_tokens=64, prompts=1000)
    size = batch_size(need, requested=None, n_prompts=1000)   # the largest that fits, or UsageError

The estimate (bytes) is the weights, the host's copy of the token-id prompts, and per prompt row:
the dense KV cache (layers x kv heads x head_dim x cache length x 2, `dense_cache_bytes`), the
prefill's logits (bucket x vocabulary, float32) and its widest activations (bucket x (4 x d_model +
d_ff) and one layer's attention scores, float32). It errs on the high side; the memory available is
the accelerator's free bytes (memory_stats) or, on the CPU, /proc/meminfo's MemAvailable.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from qsjax.dense.config import ModelConfig
from qsjax.runtime.buckets import cache_slots, prompt_bucket
from qsjax.runtime.cli import UsageError

HEADROOM = 0.9  # use at most this share of the memory available
PY_LIST_BYTES = (56, 8)  # a Python list of token ids: its header, and one pointer per id (small ints are shared)


@dataclasses.dataclass(frozen=True)
class Need:
    """Estimated bytes: fixed for the run, and per prompt row of a batch."""

    weights: int
    host: int  # the token-id prompts held on the host
    per_row: int  # KV cache + activations of one prompt row
    what: str  # what one row is, for messages: "a prompt of 40 tokens and 64 new tokens"

    def total(self, batch: int) -> int:
        return self.weights + self.host + batch * self.per_row


def weight_bytes(cfg: ModelConfig, dtype) -> int:
    """Parameters x dtype bytes: embeddings (and an untied head), GPT-2's positions, per layer attention and MLP."""
    d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    positions = cfg.max_positions * d if cfg.arch == "gpt2" else 0
    mlp = (2 if cfg.arch == "gpt2" else 3) * d * cfg.d_ff
    per_layer = d * q + 2 * d * kv + q * d + mlp + 4 * d
    return (embeddings + positions + cfg.n_layers * per_layer) * np.dtype(dtype).itemsize


def row_bytes(cfg: ModelConfig, dtype, longest_prompt: int, max_new_tokens: int) -> int:
    """One prompt row's KV cache, prefill logits and widest activations (see the module docstring)."""
    from qsjax.dense.kvcache import dense_cache_bytes

    bucket = prompt_bucket(longest_prompt, cfg.max_positions)
    length = cache_slots(bucket, max_new_tokens)
    kv = dense_cache_bytes(cfg, 1, length, dtype)
    logits = bucket * cfg.vocab_size * 4
    activations = bucket * (4 * cfg.d_model + cfg.d_ff) * 4 + cfg.n_heads * bucket * length * 4
    return kv + logits + activations


def estimate(cfg: ModelConfig, dtype, longest_prompt: int, max_new_tokens: int, prompts: int,
             prompt_tokens: int | None = None) -> Need:
    """`prompts` token-id prompts of at most `longest_prompt` tokens (`prompt_tokens` in all, default
    every prompt the longest), `max_new_tokens` each."""
    total_tokens = prompts * longest_prompt if prompt_tokens is None else prompt_tokens
    host = prompts * PY_LIST_BYTES[0] + total_tokens * PY_LIST_BYTES[1]
    return Need(weight_bytes(cfg, dtype), host, row_bytes(cfg, dtype, longest_prompt, max_new_tokens),
                f"a prompt of {longest_prompt} tokens and {max_new_tokens} new tokens")


def available_bytes() -> int | None:
    """Free memory where the model runs: the first accelerator's free bytes, else MemAvailable (None if unknown)."""
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def batch_size(need: Need, requested: int | None, n_prompts: int, flag: str = "--batch-size",
               fix: str = "lower --max-new-tokens or use a smaller --dtype") -> int:
    """The prompts per batch: `requested` (or, if None, as many as fit, at most n_prompts), checked
    against the memory available; UsageError when it does not fit, naming the estimate and `fix`."""
    available = available_bytes()
    wanted = min(requested or n_prompts, n_prompts)
    if available is None:
        return wanted
    budget = int(available * HEADROOM)
    if need.total(1) > budget:
        raise UsageError(
            f"not enough memory: {need.what} needs about {gb(need.total(1))} (weights {gb(need.weights)}, "
            f"KV cache and activations {gb(need.per_row)}, prompts {gb(need.host)}) and {gb(available)} is "
            f"available; {fix}")
    fits = (budget - need.weights - need.host) // need.per_row
    if requested is not None and requested > fits and n_prompts > fits:
        raise UsageError(f"{flag} {requested} needs about {gb(need.total(min(requested, n_prompts)))} and "
                         f"{gb(available)} is available; give {flag} {fits} or less")
    return max(1, min(wanted, fits))


def batches(items: list, size: int) -> list[list]:
    """`items` in consecutive batches of `size` (the last may be shorter), in order."""
    return [items[i:i + size] for i in range(0, len(items), size)]
