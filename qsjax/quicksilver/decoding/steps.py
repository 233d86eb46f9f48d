"""QuickSilver in generation: the prompt runs through the mechanisms, the cache keeps their result.

`scope=context`: every prompt token but the last may halt or fuse; the last prompt token and every
generated token run all layers, attending to what the prompt left in each layer's cache (halted
tokens' keys masked, zeroed or propagated; a fused group's single key with its log-size bias):
`QuickSilverCache.decode_step`.
`scope=all`: the last prompt token and every generated token are eligible too (the paper's
semantics): each decode step runs the mechanisms on its token (`decode`), with the decisions the
window pass over the whole sequence would make.

For reporting, `PromptSummary.to_json` counts what the mechanisms did to the prompt and
`generated_to_json` what they did to the generated tokens (scope all; under scope context every
generated token runs every layer).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qsjax.dense import blocks
from qsjax.dense.model import Layout, Model
from qsjax.quicksilver.decoding.cache import QuickSilverCache
from qsjax.quicksilver.settings import QuickSilverConfig
from qsjax.quicksilver.decoding.decode import DecodeState, StepDecisions, quicksilver_decode_step
from qsjax.quicksilver.mechanisms.matryoshka import quantize_blocks
from qsjax.quicksilver.window.state import LayerStats, Tokens
from qsjax.quicksilver.window.forward import quicksilver_window


def prepare(model: Model, qs: QuickSilverConfig, store=None) -> Model:
    """The model as QuickSilver runs it: layers >= amq_layer stored as int8 (float weights dropped),
    naive per-channel, or nested group-wise with a calibrated `store` (`amqstore.ClipStore`)."""
    qs.validate_for(model.cfg.n_layers)
    if qs.amq_layer is None:
        return model
    module = model.module()
    quantize_blocks(module, qs.amq_layer - 1, grouped=qs.compact, store=store)
    return dataclasses.replace(Model.from_module(module), mesh=model.mesh)


def prompt_in_scope(qs: QuickSilverConfig, valid):
    """Prompt tokens the scope lets the mechanisms touch: all real ones, or (context) all but the last slot."""
    if qs.scope == "all":
        return valid
    return valid.at[:, -1].set(False)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefill:
    """A QuickSilver prompt: the last position's logits [B, V], what decoding continues from (a
    QuickSilverCache, or under scope=all a DecodeState), the prompt's decisions, per-layer stats,
    and which tokens the mechanisms could touch [B, T]."""

    logits: jax.Array
    state: QuickSilverCache | DecodeState
    tokens: Tokens
    stats: LayerStats
    eligible: jax.Array

    def summary(self) -> PromptSummary:
        t = self.tokens
        return PromptSummary(self.stats, t.halt, t.fused, t.bits, self.eligible)


def quicksilver_prefill(qs: QuickSilverConfig, module, tokens, start, cache_length: int) -> Prefill:
    """A left-padded prompt batch through QuickSilver.  tokens [B, T], start [B]"""
    B, T = tokens.shape
    w = Layout.left_padded(module.cfg, start, T)
    needed = jnp.broadcast_to(jnp.arange(T) == T - 1, (B, T))  # only the last prompt token's prediction is read
    out = quicksilver_window(qs, module, tokens, w, prompt_in_scope(qs, w.valid), needed)
    cache = QuickSilverCache.from_window(out.layers.cache, start, cache_length)
    state = DecodeState(cache, out.layers.view) if qs.scope == "all" else cache
    return Prefill(blocks.lm_logits(module, out.x[:, -1]), state, out.tokens, out.layers.stats, out.eligible)


def quicksilver_decode(qs: QuickSilverConfig, module, state, tokens):
    """One generated token per row after `quicksilver_prefill`.
    -> logits [B, V], new state, the token's StepDecisions (scope all; None under scope context)"""
    if qs.scope == "all":
        return quicksilver_decode_step(qs, module, state, tokens)
    return *state.decode_step(module, tokens), None


def bits_histogram(qs: QuickSilverConfig, bits, chose) -> dict | None:
    """Tokens per Matryoshka width among those that chose one (None without quantization)."""
    if qs.amq_layer is None:
        return None
    return {str(b): int(((bits == b) & chose).sum()) for b in (8, 4, 2)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptSummary:
    """What the mechanisms did to a left-padded prompt batch: per-layer stats [L, B]; halt layer,
    fused, Matryoshka width and eligibility [B, T]."""

    stats: LayerStats
    halt: jax.Array
    fused: jax.Array
    bits: jax.Array
    eligible: jax.Array

    def to_json(self, qs: QuickSilverConfig, start) -> dict:
        """Counts over the real prompt tokens (slot >= start[b]), summed over the batch."""
        computing = np.asarray(self.stats.computing).sum(1)  # [L]
        L, T = len(computing), self.halt.shape[1]
        real = np.arange(T)[None, :] >= np.asarray(start)[:, None]
        halt, fused = np.asarray(self.halt), np.asarray(self.fused)
        halted, fused = int(((halt < L) & ~fused & real).sum()), int((fused & real).sum())
        n = int(real.sum())
        return {
            "tokens": n,
            "tokens_full_depth": n - halted - fused,
            "tokens_halted": halted,
            "tokens_fused": fused,
            "computing_tokens_per_layer": computing.tolist(),
            "mean_computing_tokens_per_layer": float(computing.mean()),
            "fraction_token_layers_executed": float(computing.sum()) / max(1, n * L),
            "attention_pairs": int(np.asarray(self.stats.pairs).sum()),
            "kv_writes_skipped": int(np.asarray(self.stats.kv_skipped).sum()),
            "bits_histogram": bits_histogram(qs, np.asarray(self.bits), np.asarray(self.eligible) & real),
        }


def generated_to_json(qs: QuickSilverConfig, n_layers: int, decoded, decisions: StepDecisions | None) -> dict:
    """What the mechanisms did to the generated tokens that went through a decode step (decoded
    [B, N]; decisions [B, N] each, None under scope context, where every one runs every layer).
    `fusions` counts tokens that absorbed their predecessor (the first one's is the prompt's last)."""
    decoded = np.asarray(decoded)
    n = int(decoded.sum())
    if decisions is None:
        return {"decided": False, "tokens": n, "tokens_full_depth": n, "tokens_halted": 0, "fusions": 0,
                "fraction_token_layers_executed": 1.0 if n else None, "bits_histogram": None}
    halt = np.asarray(decisions.halt)
    halted = int(((halt < n_layers) & decoded).sum())
    return {
        "decided": True,
        "tokens": n,
        "tokens_full_depth": n - halted,
        "tokens_halted": halted,
        "fusions": int((np.asarray(decisions.prev_fused) & decoded).sum()),
        "fraction_token_layers_executed": int(halt[decoded].sum()) / (n * n_layers) if n else None,
        "bits_histogram": bits_histogram(qs, np.asarray(decisions.bits), decoded),
    }
