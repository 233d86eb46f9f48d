"""Perplexity under QuickSilver: the dense harness's loop (`perplexity.evaluate`) with QuickSilver's
NLL function, and executed-FLOP accounting of every batch."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from qsjax.evaluation.flops import needed_flops
from qsjax.evaluation.perplexity import Scorer, Window, evaluate
from qsjax.runtime.programs import Programs
from qsjax.quicksilver.accounting import Accounting, weight_reads
from qsjax.quicksilver.window.rows import compaction_buckets
from qsjax.quicksilver.settings import QuickSilverConfig
from qsjax.quicksilver.decoding.steps import prepare
from qsjax.quicksilver.window.scoring import quicksilver_nll
from qsjax.quicksilver.window.forward import dense_prefix, segments


class QuickSilverScorer(Scorer):
    """A `perplexity.Scorer` of `quicksilver_nll` for one model (prepared: AMQ quantized) and setting;
    its by-products are `scoring.Scored`. store: the calibrated AMQ store (`amqstore.ClipStore`) to
    quantize with, None for the naive one (a model already quantized keeps its store)."""

    def __init__(self, model, qs: QuickSilverConfig, store=None):
        self.qs = qs
        self.kv_itemsize = np.dtype(model.dtype).itemsize  # the float model's K/V (AMQ may store int8 weights)

        def nll_fn(module, tokens, lengths, offset):
            out = quicksilver_nll(qs, module, tokens, lengths, offset)
            return out.nll, out

        super().__init__(prepare(model, qs, store), nll_fn)


class ThresholdScorer(QuickSilverScorer):
    """A `QuickSilverScorer` of drift + entropy halting whose thresholds (tau_drift, tau_H) are
    arguments of the compiled program rather than constants in it: one program per window shape
    serves a whole grid of them (`at`). The same NLL as a QuickSilverScorer of the same setting."""

    def __init__(self, model, qs: QuickSilverConfig, store=None):
        if qs.halt != "drift" or qs.halt_drift is None or qs.halt_entropy is None:
            raise ValueError("ThresholdScorer needs drift + entropy halting (halt=drift, both thresholds set)")
        super().__init__(model, qs, store)
        prepared = self.model

        def program(arguments, tokens, lengths, offset):
            state, (tau_drift, tau_entropy) = arguments
            at = copy.copy(qs)  # the thresholds traced: qs's own values passed its checks, these pass `at`'s
            object.__setattr__(at, "halt_drift", tau_drift)
            object.__setattr__(at, "halt_entropy", tau_entropy)
            out = quicksilver_nll(at, prepared.module(state), tokens, lengths, offset)
            return out.nll, out

        self._programs = Programs(program, static_argnums=3)
        self.at(qs)

    def at(self, qs: QuickSilverConfig) -> "ThresholdScorer":
        """Score at qs's thresholds next; qs may differ from the first setting in them only."""
        same = lambda c: dataclasses.replace(c, halt_drift=0.0, halt_entropy=0.0)
        if same(qs) != same(self.qs):
            raise ValueError("ThresholdScorer.at: only halt_drift and halt_entropy may change")
        self.qs, self.thresholds = qs, (np.float32(qs.halt_drift), np.float32(qs.halt_entropy))
        return self

    def arguments(self):
        return self.model.state, self.thresholds


def compaction_report(qs: QuickSilverConfig, n_layers: int, lengths: list[int]) -> dict:
    """How the compiled programs are built: one per window shape; inside each, the layers below the
    first decision are one plain scanned block, and every layer of a later segment picks one of the
    window length's buckets (`lax.switch`), so a program holds at most 1 + buckets x segments
    distinct layer bodies."""
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
    """Score `windows` under QuickSilver .
    -> PerplexityResult (flops = executed work incl. overhead), the statistics JSON, and the decisions
    of the first `keep_decisions` windows (for heatmaps)."""
    cfg, qs = scorer.model.cfg, scorer.qs
    acct = Accounting(cfg, scorer.kv_itemsize, reads=weight_reads(scorer.model.module()))
    dense = dense_full = None
    decisions, lengths_seen = [], []

    def on_batch(batch, lengths, out):
        nonlocal dense, dense_full
        halt, fused, bits, eligible = (np.asarray(a) for a in (out.halt, out.fused, out.bits, out.eligible))
        real = np.arange(batch.length)[None, :] < lengths[:, None]
        hist = {b: int(((bits == b) & eligible).sum()) for b in (8, 4, 2)} if qs.amq_layer else None
        widths = {b: int(((bits == b) & real).sum()) for b in (8, 4, 2)} if qs.amq_layer else None
        lm_positions = int(batch.scored().sum())
        flops = acct.add(out.stats, int(lengths.sum()), lm_positions, int(np.asarray(out.amq_checks).sum()),
                         halted=int(((halt < cfg.n_layers) & ~fused & real).sum()), fused=int((fused & real).sum()),
                         bits_hist=hist, widths=widths)
        base = needed_flops(cfg, lengths.tolist(), lm_positions)
        full = needed_flops(cfg, lengths.tolist(), int(lengths.sum()))  # a forward with logits everywhere
        dense = base if dense is None else dense + base
        dense_full = full if dense_full is None else dense_full + full
        lengths_seen.append(batch.length)
        for row, w in enumerate(batch.windows[: max(0, keep_decisions - len(decisions))]):
            decisions.append({"begin": w.begin, "tokens": stream[w.begin:w.end].tolist(),
                              "halt_layer": halt[row, :w.length].tolist(), "fused": fused[row, :w.length].tolist(),
                              "bits": bits[row, :w.length].tolist(), "eligible": eligible[row, :w.length].tolist()})
        return flops

    result = evaluate(scorer, stream, windows, batch_size, progress, on_batch, desc="perplexity (quicksilver)")
    stats = acct.to_json() | {
        "dense_needed_flops": dense.total,
        "executed_flops_reduction": 1 - acct.flops.total / dense.total,
        # against a Hugging Face-style forward that computes logits at every position
        "dense_full_lm_head_flops": dense_full.total,
        "executed_flops_reduction_vs_full_lm_head": 1 - acct.flops.total / dense_full.total,
        "compaction": compaction_report(qs, cfg.n_layers, lengths_seen),
    }
    return result, stats, decisions
