"""Analytic FLOP counts of the work a forward pass executes.

A multiply-add counts as 2 FLOPs, so an [M, K] @ [K, N] matmul is 2 M K N. Only the matmuls are
counted, split four ways (D model width, H query heads, K key/value heads, Dh head width, F MLP
width, V vocabulary):

    projections  per token and layer   2 D (H + 2 K) Dh   (Q, K, V)   +   2 H Dh D   (O)
    mlp          per token and layer   2 D F x 2 (GPT-2: fc, proj)   or   x 3 (Llama: gate, up, down)
    attention    per (query, key) pair and layer   2 H Dh (Q K^T)   +   2 H Dh (P V)
    lm_head      per position whose logits are computed   2 D V

Norms, activations, RoPE, the softmax, biases and the embedding lookup are left out: each is a few
FLOPs per element against the 2 D (or 2 Dh) per element of the matmuls next to them, so they add
about 1-3% at the sizes of real models (and of the test, which checks these counts against XLA's
own count of a compiled forward).

One convention for every report (`qsjax.eval`, QuickSilver's accounting, the benchmarks): the work
a forward *needs*, `needed_flops` for a dense forward: every real token through every layer, the
causal (query, key) pairs n (n + 1) / 2 of a window of n real tokens, the LM head where logits are
read. QuickSilver's accounting counts the same for the tokens and pairs its decisions leave, plus
the mechanisms' own overhead, so the two are comparable.

What a compiled dense forward *executes* is a little more (padding, and the masked scores inside the
(query block, key block) pairs of `qsjax.dense.attention` that straddle the diagonal):
`dense_forward_flops` counts that, and is checked against XLA's own count of the compiled program
(tests/test_flops.py), which checks the per-piece formulas below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from qsjax.dense.config import ModelConfig
from qsjax.dense.attention import causal_pairs_executed


@dataclasses.dataclass(frozen=True)
class Flops:
    """FLOPs of executed work, by kind.  Add two with `+`."""

    attention: int = 0
    projections: int = 0
    mlp: int = 0
    lm_head: int = 0

    @property
    def total(self) -> int:
        return self.attention + self.projections + self.mlp + self.lm_head

    def __add__(self, other: Flops) -> Flops:
        return Flops(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))

    def to_json(self, tokens_scored: int) -> dict:
        """{"total", "per_token" (per scored token), "attention", "projections", "mlp", "lm_head"}"""
        per_token = self.total / tokens_scored if tokens_scored else float("nan")
        return {"total": self.total, "per_token": per_token, **dataclasses.asdict(self)}


def projection_flops(cfg: ModelConfig, tokens: int) -> int:
    """Q, K, V and O projections of `tokens` tokens in one layer: 2 D (H + 2 K) Dh + 2 H Dh D each."""
    qkv = 2 * cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    out = 2 * cfg.n_heads * cfg.head_dim * cfg.d_model
    return tokens * (qkv + out)


def mlp_flops(cfg: ModelConfig, tokens: int) -> int:
    """The MLP of `tokens` tokens in one layer: 2 D F per matrix, 2 matrices (GPT-2) or 3 (Llama)."""
    matrices = 2 if cfg.arch == "gpt2" else 3
    return tokens * matrices * 2 * cfg.d_model * cfg.d_ff


def attention_flops(cfg: ModelConfig, pairs: int) -> int:
    """Scores Q K^T and the weighted sum P V over `pairs` (query, key) pairs in one layer: 4 H Dh each."""
    return pairs * 4 * cfg.n_heads * cfg.head_dim


def lm_head_flops(cfg: ModelConfig, positions: int) -> int:
    """The LM head on `positions` positions: 2 D V each."""
    return positions * 2 * cfg.d_model * cfg.vocab_size


def forward_flops(
    cfg: ModelConfig,
    tokens_per_layer: Sequence[int],
    attention_pairs_per_layer: Sequence[int],
    lm_head_positions: int,
) -> Flops:
    """One forward pass: layer l runs its projections and MLP on `tokens_per_layer[l]` tokens and
    computes `attention_pairs_per_layer[l]` (query, key) pairs; the LM head runs on
    `lm_head_positions` positions."""
    assert len(tokens_per_layer) == len(attention_pairs_per_layer) == cfg.n_layers
    return Flops(
        attention=sum(attention_flops(cfg, p) for p in attention_pairs_per_layer),
        projections=sum(projection_flops(cfg, t) for t in tokens_per_layer),
        mlp=sum(mlp_flops(cfg, t) for t in tokens_per_layer),
        lm_head=lm_head_flops(cfg, lm_head_positions),
    )


def needed_flops(cfg: ModelConfig, window_lengths: Sequence[int], lm_head_positions: int) -> Flops:
    """What a dense forward needs for windows of these real lengths (the reporting convention):
    every token through every layer, n (n + 1) / 2 causal pairs per window and layer, the LM head on
    `lm_head_positions` positions."""
    L = cfg.n_layers
    tokens = sum(window_lengths)
    pairs = sum(n * (n + 1) // 2 for n in window_lengths)
    return forward_flops(cfg, [tokens] * L, [pairs] * L, lm_head_positions)


def dense_forward_flops(cfg: ModelConfig, batch: int, length: int, lm_head_positions: int) -> Flops:
    """A dense forward of `batch` windows of `length` tokens (padding included: it is computed),
    attention as `qsjax.dense.attention` executes it, and the LM head on `lm_head_positions` positions in all."""
    tokens = batch * length
    pairs = batch * causal_pairs_executed(length)
    return forward_flops(cfg, [tokens] * cfg.n_layers, [pairs] * cfg.n_layers, lm_head_positions)
