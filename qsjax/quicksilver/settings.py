"""QuickSilver settings: one frozen dataclass, every mechanism switchable alone, and presets.

Layers are numbered 1..L as in the paper: "after layer l" means once block l has run.
"""

from __future__ import annotations

import dataclasses

SCOPES = ("all", "context")
HALT_POLICIES = ("none", "drift", "cutoff", "select")
KV_MODES = ("mask", "zero", "propagate")
SELECT_SIGNALS = ("attention", "recency")
SELECT_HEADS = ("sum", "max")
POOL_KINDS = ("max", "avg")


@dataclasses.dataclass(frozen=True)
class QuickSilverConfig:
    # which tokens the mechanisms may touch: "all" (the paper) or "context" (tokens whose own
    # prediction nobody needs); the first n_sink tokens are never touched
    scope: str = "context"
    n_sink: int = 4
    # Dynamic Token Halting
    halt: str = "none"  # none | drift (the paper's rule) | cutoff (depth cut-off) | select (importance)
    halt_min_layer: int = 1  # l_min: drift/entropy tests and fusion run after layers >= l_min
    halt_drift: float | None = 0.045  # tau_drift; None disables the drift test
    halt_entropy: float | None = 1.15  # tau_H in bits; None disables the entropy test
    drift_relative: bool = True  # ||h^l - h^(l-1)|| / ||h^(l-1)||, else the raw L2 distance
    halt_cutoff_layer: int = 0  # c, for cutoff and select
    keep_top_k: float = 0.5  # select: fraction of eligible tokens that keep computing after c
    select_signal: str = "attention"  # select: attention received from the last queries, or recency
    select_queries: int = 16  # select/attention: how many of the last eligible queries vote
    select_heads: str = "sum"  # select/attention: sum the KV heads' received attention, or take their max
    select_accumulate: bool = False  # select/attention: sum the votes of layers 1..c (H2O), not layer c's alone
    select_pool: int = 0  # select: pool the score over this many neighbouring positions (odd; 0 or 1: off)
    select_pool_kind: str = "max"  # max | avg
    select_recent: float = 0  # select: the most recent candidates kept first, inside the keep_top_k budget:
    #   a count (a whole number >= 1), or below 1 a share of the budget
    select_min_keep: int = 0  # select: keep at least this many eligible tokens (short prompts lose nothing)
    halt_cutoff_layer2: int | None = None  # select, a pyramid: a second selection after layer c2 > c ...
    keep_top_k2: float | None = None  # ... keeping this fraction (< keep_top_k) of the eligible tokens
    # local attention (`local`): context tokens but the last local_full attend only to the sinks, the
    # first local_prefix tokens and the last local_window slots up to their own, in every layer; None: off
    local_window: int | None = None
    local_full: int = 512
    local_prefix: int = 0
    # KV Cache Skipping for a halted token in the layers above its halt
    kv_skip: str = "mask"  # mask | zero | propagate
    kv_propagate_span: int | None = None  # propagate: only this many layers above the halt, mask beyond
    # Contextual Token Fusion
    fuse_threshold: float | None = None  # tau_fuse on cosine similarity; None disables fusion
    # Adaptive Matryoshka Quantization
    amq_layer: int | None = None  # l_q: int8 weights from this layer up; None disables AMQ
    amq_low: float = 1.0  # tau_low (bits of entropy)
    amq_high: float = 3.0  # tau_high
    # execution, not semantics: run only the computing rows (bucketed compaction), or every row
    # masked (the reference); both give the same decisions and logits
    compact: bool = True

    def __post_init__(self):
        def check(ok, message):
            if not ok:
                raise ValueError(message)

        check(self.scope in SCOPES, f"scope must be one of {SCOPES}, got {self.scope!r}")
        check(self.halt in HALT_POLICIES, f"halt must be one of {HALT_POLICIES}, got {self.halt!r}")
        check(self.kv_skip in KV_MODES, f"kv_skip must be one of {KV_MODES}, got {self.kv_skip!r}")
        check(self.select_signal in SELECT_SIGNALS, f"select_signal must be one of {SELECT_SIGNALS}")
        check(self.n_sink >= 0, "n_sink must be >= 0")
        check(self.halt_min_layer >= 1, "halt_min_layer counts layers from 1")
        check(0 < self.keep_top_k <= 1, f"keep_top_k must be in (0, 1], got {self.keep_top_k}")
        check(self.select_queries >= 1, "select_queries must be >= 1")
        check(self.select_heads in SELECT_HEADS, f"select_heads must be one of {SELECT_HEADS}")
        check(self.select_pool_kind in POOL_KINDS, f"select_pool_kind must be one of {POOL_KINDS}")
        check(self.select_pool >= 0 and (self.select_pool <= 1 or self.select_pool % 2 == 1),
              f"select_pool must be 0, 1 or an odd window, got {self.select_pool}")
        check(self.select_recent >= 0 and (self.select_recent < 1 or float(self.select_recent).is_integer()),
              f"select_recent must be a count (a whole number >= 1) or a share of the budget in [0, 1), "
              f"got {self.select_recent}")
        check(self.select_min_keep >= 0, "select_min_keep must be >= 0")
        check(self.local_window is None or self.local_window >= 1, f"local_window must be >= 1, got {self.local_window}")
        check(self.local_full >= 0, f"local_full must be >= 0, got {self.local_full}")
        check(self.local_prefix >= 0, f"local_prefix must be >= 0, got {self.local_prefix}")
        check(self.local_window is None or self.scope == "context",
              "local attention needs scope=context (only tokens whose predictions nobody needs attend locally)")
        check((self.halt_cutoff_layer2 is None) == (self.keep_top_k2 is None),
              "halt_cutoff_layer2 and keep_top_k2 go together (a second selection stage)")
        check(self.amq_low <= self.amq_high, "amq_low must be <= amq_high")
        check(self.kv_propagate_span is None or self.kv_propagate_span >= 0, "kv_propagate_span must be >= 0")
        if self.halt in ("cutoff", "select"):
            check(self.halt_cutoff_layer >= 1, f"halt={self.halt} needs halt_cutoff_layer >= 1")
        if self.halt == "select":
            check(self.scope == "context", "importance selection needs scope=context (it looks at the last "
                  "context queries, which would otherwise see tokens whose predictions are scored)")
            if self.select_signal != "attention":
                check(self.select_heads == "sum" and not self.select_accumulate and self.select_pool <= 1,
                      "select_heads, select_accumulate and select_pool shape the attention signal: they need "
                      "select_signal=attention")
            if self.halt_cutoff_layer2 is not None:
                check(self.halt_cutoff_layer2 > self.halt_cutoff_layer,
                      f"halt_cutoff_layer2={self.halt_cutoff_layer2} must be after "
                      f"halt_cutoff_layer={self.halt_cutoff_layer}")
                check(0 < self.keep_top_k2 < self.keep_top_k,
                      f"keep_top_k2={self.keep_top_k2} must be in (0, keep_top_k={self.keep_top_k})")
        else:
            check(self.halt_cutoff_layer2 is None, "halt_cutoff_layer2 is a second stage of halt=select")
        if self.halt == "drift":
            check(self.halt_drift is not None or self.halt_entropy is not None,
                  "halt=drift needs the drift test, the entropy test, or both")

    @property
    def enabled(self) -> bool:
        """Whether any mechanism is on (all off: the dense forward is used)."""
        return (self.halt != "none" or self.fuse_threshold is not None or self.amq_layer is not None
                or self.local_window is not None)

    @property
    def select_stages(self) -> tuple[tuple[int, float], ...]:
        """Importance selection's (layer, keep fraction) stages, in depth order (one, or two: a pyramid)."""
        stages = ((self.halt_cutoff_layer, self.keep_top_k),)
        if self.halt_cutoff_layer2 is not None:
            stages += ((self.halt_cutoff_layer2, self.keep_top_k2),)
        return stages

    def validate_for(self, n_layers: int) -> None:
        """Raise if a layer setting does not fit a model of n_layers."""
        for name in ("halt_min_layer", "halt_cutoff_layer", "halt_cutoff_layer2"):
            value = getattr(self, name)
            if value is not None and value > n_layers:
                raise ValueError(f"{name}={value} but the model has {n_layers} layers")
        if self.amq_layer is not None and not 1 <= self.amq_layer <= n_layers:
            raise ValueError(f"amq_layer={self.amq_layer} must be in 1..{n_layers}")


OFF = QuickSilverConfig()


def preset(name: str, n_layers: int) -> QuickSilverConfig:
    """`paper`: the paper's rule (drift + entropy halting, zero K/V, fusion, Matryoshka widths) on every
    token, at qsjax's reading of its thresholds (the abstract gives none: tau_drift, tau_H, l_min = L/4,
    tau_fuse, l_q = L/2 + 1 and the width thresholds are ours); `fast`: qsjax's calibrated setting
    (context tokens only); `long`: context selection for long prompts (see below)."""
    if name == "paper":
        return QuickSilverConfig(
            scope="all", halt="drift", halt_min_layer=max(1, n_layers // 4), halt_drift=0.045, halt_entropy=1.15,
            kv_skip="zero", fuse_threshold=0.95, amq_layer=n_layers // 2 + 1, amq_low=1.0, amq_high=3.0,
        )
    if name == "fast":
        # calibrated on SmolLM2-135M (30 layers), strided 2048/512, first 4,096 tokens of WikiText-103 test and
        # of the C4 sample: the deepest-saving cut-off within +0.2 perplexity on both (scripts/sweep.py)
        return QuickSilverConfig(scope="context", halt="cutoff", halt_cutoff_layer=round(n_layers * 5 / 6), kv_skip="mask")
    if name == "long":
        # our reading of FastKV / GemFilter / SnapKV + StreamingLLM for SmolLM2-135M, calibrated with the tail
        # protocol 8192/512 on WikiText-103 and C4 and on passkey at 2,048-8,192 tokens (README, "Long
        # prompts"): after layer 8 of 30 (where the question's attention finds a needle best among the early
        # layers), 40% of the context keeps computing, at least 1,024 tokens (shorter prompts lose
        # nothing): three quarters of that budget the most recent tokens (long coherent text needs its
        # newest ~2,300 at 8,192), the rest the keys the last 16 context queries attend to most (max over
        # KV heads), pooled over 11 neighbours so that a selected key brings its neighbours
        return QuickSilverConfig(scope="context", halt="select", halt_cutoff_layer=round(n_layers * 8 / 30),
                                 keep_top_k=0.4, select_signal="attention", select_queries=16, select_heads="max",
                                 select_pool=11, select_pool_kind="max", select_recent=0.75, select_min_keep=1024,
                                 kv_skip="mask")
    if name == "off":
        return OFF
    raise ValueError(f"unknown preset {name!r} (choose from paper, fast, long, off)")
