"""Executed-FLOP accounting: the work QuickSilver's decisions leave, plus the mechanisms' own cost.

    total = needed work (tokens computing each layer, the (query, key) pairs they attend, the LM head
            where logits are needed)
          + overhead (entropy LM-head projections for halting and for quantization widths,
            K/V projections of halted tokens in propagate mode, importance selection's scores:
            n_q x T (query, key) pairs and the n_q voters' q, k, v projections per scoring layer)

This is `qsjax.evaluation.flops`' reporting convention (needed work), applied to the tokens and (query, key)
pairs the decisions leave, so it compares directly with `flops.needed_flops` of a dense forward.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qsjax.dense.config import ModelConfig
from qsjax.evaluation.flops import Flops, attention_flops, forward_flops, lm_head_flops


def kv_projection_flops(cfg: ModelConfig, tokens: int) -> int:
    """K and V projections alone: 2 D (2 K Dh) per token."""
    return tokens * 2 * cfg.d_model * 2 * cfg.n_kv_heads * cfg.head_dim


def qkv_projection_flops(cfg: ModelConfig, tokens: int) -> int:
    """Q, K and V projections: 2 D (H + 2 K) Dh per token."""
    return tokens * 2 * cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim


@dataclasses.dataclass
class Accounting:
    """Running totals over the windows of an evaluation (host-side integers); `kv_itemsize`: bytes
    per key or value element of the model evaluated (2 under bfloat16)."""

    cfg: ModelConfig
    kv_itemsize: int
    flops: Flops = Flops()
    overhead: Flops = Flops()
    token_layers: int = 0  # real tokens x layers
    token_layers_executed: int = 0
    kv_writes: int = 0  # real tokens x layers whose K/V a dense pass writes
    kv_skipped: int = 0
    tokens: int = 0
    tokens_fused: int = 0
    tokens_halted: int = 0
    bits: dict = dataclasses.field(default_factory=lambda: {8: 0, 4: 0, 2: 0})

    def add(self, stats, real_tokens: int, lm_head_positions: int, amq_checks: int, halted: int, fused: int,
            bits_hist: dict | None = None) -> Flops:
        """Add one forward's per-layer stats ([L, B] arrays as numpy). Returns that forward's FLOPs."""
        cfg = self.cfg
        computing = np.asarray(stats.computing).sum(1)  # [L]
        pairs = np.asarray(stats.pairs).sum(1)
        propagated = int(np.asarray(stats.propagated).sum())
        checks = int(np.asarray(stats.entropy_checks).sum()) + int(amq_checks)
        selection = int(np.asarray(stats.selection_pairs).sum())
        voters = int(np.asarray(stats.selection_queries).sum())
        overhead = Flops(
            attention=attention_flops(cfg, selection) // 2,  # scores only (Q K^T), no P V
            projections=kv_projection_flops(cfg, propagated) + qkv_projection_flops(cfg, voters),
            lm_head=lm_head_flops(cfg, checks),
        )
        needed = forward_flops(cfg, computing.tolist(), pairs.tolist(), lm_head_positions)
        total = needed + overhead
        self.flops += total
        self.overhead += overhead
        L = cfg.n_layers
        self.tokens += real_tokens
        self.token_layers += real_tokens * L
        self.token_layers_executed += int(computing.sum())
        self.kv_writes += real_tokens * L
        self.kv_skipped += int(np.asarray(stats.kv_skipped).sum())
        self.tokens_halted += halted
        self.tokens_fused += fused
        for b, n in (bits_hist or {}).items():
            self.bits[b] = self.bits.get(b, 0) + n
        return total

    def cache_bytes_saved(self) -> int:
        """K and V entries not written, in bytes of the model's K/V dtype (what a cache keeping only
        the written entries would save; the generator's `kv_cache_bytes` reports what is allocated)."""
        return self.kv_skipped * 2 * self.cfg.n_kv_heads * self.cfg.head_dim * self.kv_itemsize

    def to_json(self) -> dict:
        return {
            "fraction_token_layers_executed": self.token_layers_executed / max(1, self.token_layers),
            "token_layers": self.token_layers,
            "token_layers_executed": self.token_layers_executed,
            "kv_writes_skipped": self.kv_skipped,
            "kv_writes_skipped_fraction": self.kv_skipped / max(1, self.kv_writes),
            "cache_bytes_saved": self.cache_bytes_saved(),
            "tokens": self.tokens,
            "tokens_halted": self.tokens_halted,
            "tokens_fused": self.tokens_fused,
            "bits_histogram": {str(k): v for k, v in sorted(self.bits.items(), reverse=True)},
            "overhead_flops": dataclasses.asdict(self.overhead) | {"total": self.overhead.total},
        }
