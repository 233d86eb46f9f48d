"""Perplexity under QuickSilver, with executed-FLOP accounting, over the same windows as the dense harness."""

from __future__ import annotations

import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from qsjax.perplexity import PerplexityResult, Window, make_batches
from qsjax.quicksilver.accounting import Accounting, dense_needed_flops
from qsjax.quicksilver.config import QuickSilverConfig
from qsjax.quicksilver.generation import prepare
from qsjax.quicksilver.scoring import quicksilver_nll


class QuickSilverScorer:
    """`quicksilver_nll` for one model and setting, compiled once per (batch, length, offset)."""

    def __init__(self, model, qs: QuickSilverConfig):
        self.qs = qs
        self.model = prepare(model, qs)
        f = lambda state, tokens, lengths, offset: quicksilver_nll(qs, self.model.module(state), tokens, lengths, offset)
        self._jit = jax.jit(f, static_argnums=3)
        self._compiled: dict = {}

    def compile(self, batch: int, length: int, offset: int) -> float:
        key = (batch, length, offset)
        if key in self._compiled:
            return 0.0
        t0 = time.perf_counter()
        tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
        lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
        self._compiled[key] = self._jit.lower(self.model.state, tokens, lengths, offset).compile()
        return time.perf_counter() - t0

    def __call__(self, tokens: np.ndarray, lengths: np.ndarray, offset: int):
        self.compile(*tokens.shape, offset)
        return self._compiled[(*tokens.shape, offset)](self.model.state, tokens, lengths)


def compaction_report(qs: QuickSilverConfig, n_layers: int, lengths: list[int]) -> dict:
    """How the compiled programs are built: one per window shape; inside each, the layers below the
    first decision are one plain scanned block, and every layer of a later segment picks one of the
    window length's buckets (`lax.switch`), so a program holds at most 1 + buckets x segments
    distinct layer bodies."""
    from qsjax.quicksilver.compaction import compaction_buckets
    from qsjax.quicksilver.forward import dense_prefix, segments

    on = qs.compact and qs.kv_skip != "zero"
    start = dense_prefix(qs, n_layers)
    n_segments = len(segments(qs, n_layers, start))
    per_length = {T: list(compaction_buckets(T)) if on else [T] for T in dict.fromkeys(lengths)}
    return {
        "compacted": on,
        "dense_layers": start,
        "segments": n_segments,
        "buckets": {str(T): b for T, b in per_length.items()},
        "layer_bodies_per_program": {str(T): (start > 0) + len(b) * n_segments for T, b in per_length.items()},
    }


def evaluate_quicksilver(scorer: QuickSilverScorer, stream: np.ndarray, windows: list[Window], batch_size: int = 1,
                         progress: bool = True, keep_decisions: int = 0):
    """Score `windows` under QuickSilver.  -> PerplexityResult (flops = executed work incl. overhead),
    the statistics JSON, the dense baseline's needed FLOPs, and the decisions of the first
    `keep_decisions` windows (for heatmaps)."""
    cfg = scorer.model.cfg
    batches = make_batches(windows, batch_size)
    shapes = list(dict.fromkeys(b.key for b in batches))
    seconds_compile = sum(scorer.compile(*key) for key in shapes)
    acct = Accounting(cfg)
    dense = dense_full = None
    token_nll_out = np.full(len(stream), np.nan, np.float32)
    nll_sum, decisions = 0.0, []
    bar = tqdm(total=len(windows), unit="window", file=sys.stderr, disable=not progress, desc="perplexity (quicksilver)")
    t0 = time.perf_counter()
    for batch in batches:
        lengths = np.array([w.length for w in batch.windows], np.int32)
        nll, stats, amq_checks, (halt, fused, bits, eligible) = scorer(batch.tokens(stream), lengths, batch.offset)
        nll = np.asarray(nll)
        scored = batch.scored()
        token_nll_out[batch.targets()[scored]] = nll[scored]
        nll_sum += float(nll[scored].astype(np.float64).sum())
        halt, fused, bits, eligible = (np.asarray(a) for a in (halt, fused, bits, eligible))
        real = np.arange(batch.length)[None, :] < lengths[:, None]
        hist = {b: int(((bits == b) & real & eligible).sum()) for b in (8, 4, 2)} if scorer.qs.amq_layer else None
        lm_positions = int(scored.sum())
        acct.add(stats, int(lengths.sum()), lm_positions, int(np.asarray(amq_checks).sum()),
                 halted=int(((halt < cfg.n_layers) & ~fused & real).sum()), fused=int((fused & real).sum()), bits_hist=hist)
        base = dense_needed_flops(cfg, lengths.tolist(), lm_positions)
        dense = base if dense is None else dense + base
        full = dense_needed_flops(cfg, lengths.tolist(), int(lengths.sum()))  # a forward with logits everywhere
        dense_full = full if dense_full is None else dense_full + full
        if len(decisions) < keep_decisions:
            for row, w in enumerate(batch.windows):
                decisions.append({"begin": w.begin, "tokens": stream[w.begin:w.end].tolist(),
                                  "halt_layer": halt[row, :w.length].tolist(), "fused": fused[row, :w.length].tolist(),
                                  "bits": bits[row, :w.length].tolist(), "eligible": eligible[row, :w.length].tolist()})
        bar.update(len(batch.windows))
        bar.set_postfix(ppl=f"{math.exp(nll_sum / max(1, int(np.isfinite(token_nll_out).sum()))):.3f}")
    seconds = time.perf_counter() - t0
    bar.close()
    tokens_scored = sum(w.n_scored for w in windows)
    result = PerplexityResult(nll_sum, tokens_scored, len(windows), len(batches), seconds, seconds_compile, acct.flops,
                              token_nll_out, len(shapes))
    stats = acct.to_json() | {
        "dense_needed_flops": dense.total,
        "executed_flops_reduction": 1 - acct.flops.total / dense.total,
        # against a Hugging Face-style forward that computes logits at every position
        "dense_full_lm_head_flops": dense_full.total,
        "executed_flops_reduction_vs_full_lm_head": 1 - acct.flops.total / dense_full.total,
        "compaction": compaction_report(scorer.qs, cfg.n_layers, [length for _, length, _ in shapes]),
    }
    return result, stats, decisions[:keep_decisions]
