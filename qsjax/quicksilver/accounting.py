"""Executed-FLOP accounting: the work QuickSilver's decisions leave, plus the mechanisms' own cost.

    total = needed work (tokens computing each layer, the (query, key) pairs they attend, the LM head
            where logits are needed)
          + overhead (entropy LM-head projections for halting and for quantization widths,
            K/V projections of halted tokens in propagate mode, importance selection's scores:
            n_q x T (query, key) pairs and the n_q voters' q, k, v projections per scoring layer)

This is `qsjax.evaluation.flops`' reporting convention (needed work), applied to the tokens and (query, key)
pairs the decisions leave, so it compares directly with `flops.needed_flops` of a dense forward.

Weight bytes read per token (`WeightReads`): the blocks' linear weights (and their biases) one token's
pass reads, at the width it runs each layer: a float layer's whole matrix; a Matryoshka layer's codes
at r bits (packed: r/8 byte per weight) plus that width's scales and offsets. Every token is counted
through every block (halting's savings are in the FLOPs); the embedding and LM head are left out.
References for the same matrices: float32, bfloat16, and int8 in every block (codes plus one float32
scale per output column).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from qsjax.dense.config import ModelConfig
from qsjax.evaluation.flops import Flops, attention_flops, forward_flops, lm_head_flops


def kv_projection_flops(cfg: ModelConfig, tokens: int) -> int:
    """K and V projections alone: 2 D (2 K Dh) per token."""
    return tokens * 2 * cfg.d_model * 2 * cfg.n_kv_heads * cfg.head_dim


def qkv_projection_flops(cfg: ModelConfig, tokens: int) -> int:
    """Q, K and V projections: 2 D (H + 2 K) Dh per token."""
    return tokens * 2 * cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim


class WeightReads(NamedTuple):
    """Bytes of the blocks' linear weights one token reads: `base` in the layers held as floats,
    `views[r]` in the quantized layers at width r; the same matrices as float32, bfloat16, int8."""

    base: int
    views: dict
    float32: int
    bfloat16: int
    int8: int

    def per_token(self, bits: int) -> int:
        return self.base + self.views.get(bits, 0)

    def to_json(self, read: int, tokens: int) -> dict:
        """The mean bytes per token of `read` bytes over `tokens`, against the references."""
        mean = read / max(1, tokens)
        refs = {"float32": self.float32, "bfloat16": self.bfloat16, "int8": self.int8, "8_bits": self.per_token(8)}
        return {"read": mean, "float32_dense": self.float32, "bfloat16_dense": self.bfloat16,
                "int8_every_layer": self.int8, "every_token_at_8_bits": self.per_token(8),
                **{f"saved_vs_{k}": 1 - mean / v for k, v in refs.items()}}


def weight_reads(module) -> WeightReads:
    """What one token reads of every block's linear layers (Linear or MatryoshkaLinear)."""
    from qsjax.dense.modules import Linear
    from qsjax.quicksilver.mechanisms.matryoshka import WIDTHS, MatryoshkaLinear

    base, views, f32, bf16, int8 = 0, dict.fromkeys(WIDTHS, 0), 0, 0, 0
    for blk in module.blocks:
        for child in vars(blk).values():
            if isinstance(child, Linear):
                w = child.w[...]
                n, columns = w.size, w.size // w.shape[-2]
                base += w.nbytes
            elif isinstance(child, MatryoshkaLinear):
                q = child.weight
                n, columns = q.codes.size, q.codes.size // q.codes.shape[-2]
                for r in WIDTHS:
                    views[r] += q.read_nbytes(r)
            else:
                continue
            bias = 0 if child.b is None else child.b[...].size
            base += 0 if child.b is None else child.b[...].nbytes
            f32, bf16, int8 = f32 + 4 * (n + bias), bf16 + 2 * (n + bias), int8 + n + 4 * (columns + bias)
    return WeightReads(base, views, f32, bf16, int8)


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
    reads: WeightReads | None = None  # the model's weight reads per token (None: not counted)
    weight_bytes_read: int = 0

    def add(self, stats, real_tokens: int, lm_head_positions: int, amq_checks: int, halted: int, fused: int,
            bits_hist: dict | None = None, widths: dict | None = None) -> Flops:
        """Add one forward's per-layer stats ([L, B] arrays as numpy). Returns that forward's FLOPs.
        bits_hist: the eligible tokens per width; widths: every real token per width (None: all at 8)."""
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
        if self.reads is not None:
            self.weight_bytes_read += sum(n * self.reads.per_token(b) for b, n in (widths or {8: real_tokens}).items())
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
        } | ({} if self.reads is None else {"weight_bytes_per_token": self.reads.to_json(self.weight_bytes_read,
                                                                                          self.tokens)})
