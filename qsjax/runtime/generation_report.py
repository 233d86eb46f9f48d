"""What a generation run reports: its result (`GenerationResult`), the `--json` report of
`python -m qsjax.generate` and its closing stderr line (time to first token and decode speed apart)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qsjax.dense.sampler import Sampling


@dataclasses.dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]  # each row's new tokens, up to (not including) its EOS
    prompt_tokens: list[int]
    seconds_first_token: float  # the prefill program: prompt through the model, first new token picked
    seconds_decode: float  # the decode-loop program: every new token after the first
    seconds_compile: float
    kv_cache_bytes: dict  # {"dense": the dense KVCache of this batch and length, "this_setting": what decoding carried}
    quicksilver: dict | None = None  # {"prompt": PromptSummary.to_json, "generated": generated_to_json}
    speculation: dict | None = None  # speculative decoding's Tally.to_json (None: plain decoding)

    @property
    def seconds(self) -> float:
        """Prefill + decode, compilation excluded."""
        return self.seconds_first_token + self.seconds_decode

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self) -> float | None:
        """New tokens after each row's first, summed over the batch, per second of the decode loop
        (None when no row made a second token)."""
        n = sum(max(0, len(t) - 1) for t in self.token_ids)
        return n / self.seconds_decode if n and self.seconds_decode > 0 else None

    @property
    def prompt_layers_executed(self) -> float | None:
        """QuickSilver: the fraction of the prompt's token-layers computed."""
        return None if self.quicksilver is None else self.quicksilver["prompt"]["fraction_token_layers_executed"]


def join_results(results: list[GenerationResult]) -> GenerationResult:
    """The results of consecutive batches as one: rows in order, seconds summed, the KV cache bytes of
    the largest batch; QuickSilver's prompt share weighted by tokens, each batch's statistics kept."""
    if len(results) == 1:
        return results[0]
    qs = None
    if results[0].quicksilver is not None:
        prompts = [r.quicksilver["prompt"] for r in results]
        tokens = sum(p["tokens"] for p in prompts)
        share = sum(p["fraction_token_layers_executed"] * p["tokens"] for p in prompts) / max(1, tokens)
        qs = {"prompt": {"tokens": tokens, "fraction_token_layers_executed": share},
              "batches": [r.quicksilver for r in results]}
    kv = {key: max(r.kv_cache_bytes[key] for r in results) for key in results[0].kv_cache_bytes}
    spec = None if results[0].speculation is None else joined_speculation([r.speculation for r in results])
    return GenerationResult(
        [t for r in results for t in r.texts], [t for r in results for t in r.token_ids],
        [n for r in results for n in r.prompt_tokens], sum(r.seconds_first_token for r in results),
        sum(r.seconds_decode for r in results), sum(r.seconds_compile for r in results), kv, qs, spec)


def joined_speculation(parts: list[dict]) -> dict:
    """Consecutive batches' speculation statistics as one: counts summed, rates recomputed."""
    out = dict(parts[0])
    for key in ("drafted", "accepted", "verify_steps", "steps", "row_steps", "tokens"):
        out[key] = sum(p[key] for p in parts)
    out["acceptance_rate"] = out["accepted"] / out["drafted"] if out["drafted"] else None
    out["mean_tokens_per_step"] = out["tokens"] / out["row_steps"] if out["row_steps"] else None
    return out


def make_report(args, model_dir: Path, gen, prompts: list[str], sampling: Sampling,
                result, batch_size: int | None = None) -> dict:
    """The `--json` report: the settings, then per prompt and over the batch, counts and timings."""
    from qsjax.quicksilver.options import recorded

    qs = gen.quicksilver
    return {
        "settings": {
            "model": args.model or model_dir.name,
            "model_dir": str(model_dir),
            "dtype": args.dtype,
            "batch_size": batch_size or len(prompts),  # prompts run together (all of them, or --batch-size)
            "max_new_tokens": args.max_new_tokens,
            "chat": args.chat,
            "sampling": dataclasses.asdict(sampling) | {"seed": args.seed},
            "mesh": args.mesh,
            "speculation": None if gen.speculation is None else gen.speculation.to_json(),
            **recorded(args, qs),  # quicksilver: the whole QuickSilverConfig (None: off), which
        },  # --quicksilver-config replays; quicksilver_preset: the preset it started from
        "prompts": [{"prompt": p, "prompt_tokens": n, "new_tokens": len(ids), "text": text, "token_ids": ids}
                    for p, n, ids, text in zip(prompts, result.prompt_tokens, result.token_ids, result.texts)],
        "prompt_tokens": sum(result.prompt_tokens),
        "new_tokens": result.new_tokens,
        "ttft_seconds": result.seconds_first_token,
        "decode_seconds": result.seconds_decode,
        "decode_tokens_per_second": result.decode_tokens_per_second,
        "compile_seconds": result.seconds_compile,
        "programs_compiled": gen.programs,
        "kv_cache_bytes": result.kv_cache_bytes,
        "quicksilver": result.quicksilver,
        "speculation": result.speculation,
    }


def closing_line(result, programs: int) -> str:
    speed = result.decode_tokens_per_second
    qs = "" if result.prompt_layers_executed is None else (
        f", quicksilver: {100 * result.prompt_layers_executed:.1f}% of prompt token-layers executed")
    spec = result.speculation
    if spec is not None:
        rate = spec["acceptance_rate"]
        qs += (f", speculation: {'no drafts verified' if rate is None else f'{100 * rate:.0f}% of drafts accepted'}, "
               f"{spec['mean_tokens_per_step'] or 0:.2f} tokens per step")
    return (f"prompt tokens {sum(result.prompt_tokens)}, new tokens {result.new_tokens}, "
            f"compile {result.seconds_compile:.2f} s ({programs} compiled programs), "
            f"first token {result.seconds_first_token:.3f} s, "
            f"decode {'n/a' if speed is None else f'{speed:.1f}'} tokens/s{qs}")
