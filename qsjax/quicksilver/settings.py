"""QuickSilver settings: one frozen dataclass, every mechanism switchable alone, and presets.

Layers are numbered 1..L as in the paper: "after layer l" means once block l has run.

Each field's meaning lives once, in its `metadata` (`option` below): its one-line help, the group
it belongs to, its command-line flag and the range of values allowed. The command-line options
(qsjax.quicksilver.options), `--quicksilver-config` files and this class's docstring all read it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

SCOPES = ("all", "context")
HALT_POLICIES = ("none", "drift", "cutoff", "select")
KV_MODES = ("mask", "zero", "propagate")
SELECT_SIGNALS = ("attention", "recency")
SELECT_HEADS = ("sum", "max")
POOL_KINDS = ("max", "avg")

# the mechanism groups, in the order --help shows them
GROUPS = {
    "preset": "QuickSilver: preset and scope (off unless a preset, a config file or a mechanism flag is given)",
    "halting": "QuickSilver: token halting (which tokens stop computing, and after which layer)",
    "selection": "QuickSilver: importance selection (--halt select: which context tokens keep computing)",
    "local": "QuickSilver: local attention (far context attends to a window)",
    "kvskip": "QuickSilver: KV skipping (what a halted token leaves in the layers above its halt)",
    "fusion": "QuickSilver: token fusion",
    "matryoshka": "QuickSilver: Matryoshka quantization (narrower weights for confident tokens)",
}


class Range(NamedTuple):
    """The values a number may take: low (exclusive when `open_low`) up to high (None: unbounded)."""
    low: float
    high: float | None = None
    open_low: bool = False

    def check(self, name: str, value) -> str | None:
        """None when `value` is allowed, else why not (naming it `name`)."""
        if value is None:
            return None
        above = value > self.low if self.open_low else value >= self.low
        if math.isfinite(value) and above and (self.high is None or value <= self.high):
            return None
        shown = "" if self.high is None else f" and <= {self.high}"
        return f"{name} must be {'>' if self.open_low else '>='} {self.low}{shown}, got {value}"


def option(default, help: str, group: str, *, flag: str | None = "", range: Range | None = None,
           choices: tuple[str, ...] | None = None, advanced: bool = False):
    """A QuickSilverConfig field with its meaning: `help` (one line), `group` (GROUPS), `flag` ("": the
    field's name as a flag, --halt-min-layer; None: no flag of its own), the `range` or `choices`
    allowed, and `advanced` (listed by --help-all only)."""
    return dataclasses.field(default=default, metadata=dict(help=help, group=group, flag=flag, range=range,
                                                            choices=choices, advanced=advanced))


def flag_of(field: dataclasses.Field) -> str | None:
    """The command-line flag that sets `field` (None: it has none of its own)."""
    flag = field.metadata["flag"]
    return "--" + field.name.replace("_", "-") if flag == "" else flag


@dataclasses.dataclass(frozen=True)
class QuickSilverConfig:
    scope: str = option("context", "which tokens the mechanisms may touch: all (the paper) or context (tokens whose "
                        "own prediction nobody needs)", "preset", choices=SCOPES)
    n_sink: int = option(4, "the first N tokens (attention sinks) no mechanism touches and --kv-budget never evicts "
                         "(default 4)", "preset", range=Range(0))
    # Dynamic Token Halting
    halt: str = option("none", "halting policy: none, drift (the paper's drift + entropy rule), cutoff (every "
                       "eligible token stops after --halt-cutoff-layer) or select (importance selection); default: "
                       "implied by the other flags given", "halting", choices=HALT_POLICIES)
    halt_min_layer: int = option(1, "drift: the tests (and fusion) run after layers >= N (l_min)", "halting",
                                 range=Range(1))
    halt_drift: float | None = option(0.045, "drift: a token halts once its state moves less than X between layers "
                                      "(tau_drift) ...", "halting", range=Range(0))
    halt_entropy: float | None = option(1.15, "drift: ... and its next-token entropy is below X bits (tau_H)", "halting", range=Range(0))
    drift_relative: bool = option(True, "drift: measure the move relative to the previous state's norm (else the "
                                  "raw L2 distance)", "halting", flag=None)
    halt_cutoff_layer: int = option(0, "cutoff, select: the layer N after which tokens stop (c)", "halting",
                                    range=Range(0))
    keep_top_k: float = option(0.5, "select: the fraction X of eligible tokens that keep computing after the "
                               "cut-off", "selection", range=Range(0, 1, open_low=True))
    select_signal: str = option("attention", "select: rank by the attention the last queries give (attention) or "
                                "by position (recency)", "selection", choices=SELECT_SIGNALS)
    select_queries: int = option(16, "select/attention: how many of the last eligible queries vote", "selection",
                                 range=Range(1), advanced=True)
    select_heads: str = option("sum", "select/attention: sum the KV heads' received attention, or take their max",
                               "selection", choices=SELECT_HEADS, advanced=True)
    select_accumulate: bool = option(False, "select/attention: sum the votes of layers 1..c (H2O), not layer c's "
                                     "alone", "selection", advanced=True)
    select_pool: int = option(0, "select: pool the score over N neighbouring positions (odd; 0 or 1: off)",
                              "selection", range=Range(0), advanced=True)
    select_pool_kind: str = option("max", "select: how --select-pool pools (max or avg)", "selection",
                                   choices=POOL_KINDS, advanced=True)
    select_recent: float = option(0, "select: the most recent candidates kept first, inside the budget: a count "
                                  "N >= 1, or below 1 a share of the budget", "selection", range=Range(0))
    select_min_keep: int = option(0, "select: keep at least N eligible tokens (short prompts lose nothing)",
                                  "selection", range=Range(0))
    halt_cutoff_layer2: int | None = option(None, "select, a pyramid: a second selection after layer N (> the "
                                            "cut-off) ...", "selection", range=Range(1), advanced=True)
    keep_top_k2: float | None = option(None, "... keeping this fraction X (< --keep-top-k) of the eligible tokens",
                                       "selection", range=Range(0, 1, open_low=True), advanced=True)
    local_window: int | None = option(None, "local attention: context tokens before the last --local-full attend "
                                      "only to the sinks, the first --local-prefix tokens and the last N slots, in "
                                      "every layer (default: off)", "local", range=Range(1))
    local_full: int = option(512, "local attention: the last N context tokens attend to everything (default 512)",
                             "local", range=Range(0))
    local_prefix: int = option(0, "local attention: the first N tokens every token sees (default 0)", "local",
                               range=Range(0))
    kv_skip: str = option("mask", "a halted token's keys/values above its halt: mask (hidden from attention), zero, "
                          "or propagate (each layer's projections of its frozen state)", "kvskip", choices=KV_MODES)
    kv_propagate_span: int | None = option(None, "propagate: only N layers above the halt, mask beyond", "kvskip",
                                           range=Range(0), advanced=True)
    fuse_threshold: float | None = option(None, "fuse adjacent tokens whose states' cosine similarity is above X "
                                          "(tau_fuse; default: off)", "fusion", range=Range(-1, 1))
    amq_layer: int | None = option(None, "from layer N up, each token's weight width (8, 4 or 2 bits) follows "
                                   "its entropy at N (l_q; default: off)",
                                   "matryoshka", range=Range(1))
    amq_low: float = option(1.0, "below X bits of entropy a token uses 2 bits (tau_low)", "matryoshka",
                            range=Range(0), advanced=True)
    amq_high: float = option(3.0, "above X bits it uses 8 (tau_high; 4 between)", "matryoshka", range=Range(0),
                             advanced=True)
    compact: bool = option(True, "execution, not semantics: run only the computing rows (bucketed compaction; "
                           "true), or every row masked (the reference; --masked-reference): the same decisions and "
                           "logits", "preset",
                           flag="--masked-reference")

    def __post_init__(self):
        def check(ok, message):
            if not ok:
                raise ValueError(message)

        for field in dataclasses.fields(self):  # the choices and ranges each field's metadata gives
            value, allowed = getattr(self, field.name), field.metadata["choices"]
            check(allowed is None or value in allowed, f"{field.name} must be one of {allowed}, got {value!r}")
            if field.metadata["range"] is not None:
                why = field.metadata["range"].check(field.name, value)
                check(why is None, why)
        check(self.select_pool <= 1 or self.select_pool % 2 == 1,
              f"select_pool must be 0, 1 or an odd window, got {self.select_pool}")
        check(self.select_recent < 1 or float(self.select_recent).is_integer(),
              f"select_recent must be a count (a whole number >= 1) or a share of the budget in [0, 1), "
              f"got {self.select_recent}")
        check(self.local_window is None or self.scope == "context",
              "local attention needs scope=context (only tokens whose predictions nobody needs attend locally)")
        check((self.halt_cutoff_layer2 is None) == (self.keep_top_k2 is None),
              "halt_cutoff_layer2 and keep_top_k2 go together (a second selection stage)")
        check(self.amq_low <= self.amq_high, "amq_low must be <= amq_high")
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


def fields_doc() -> str:
    """Every field's meaning, by group (from its metadata): the class's docstring."""
    lines = []
    for group, title in GROUPS.items():
        lines.append(f"\n{title}:")
        lines += [f"    {f.name} = {f.default!r}: {f.metadata['help']}" for f in dataclasses.fields(QuickSilverConfig)
                  if f.metadata["group"] == group]
    return "\n".join(lines)


QuickSilverConfig.__doc__ = "QuickSilver's settings; the default (OFF) turns every mechanism off.\n" + fields_doc()
OFF = QuickSilverConfig()


def scaled_layer(layer: int, depth: int, n_layers: int) -> int:
    """Layer `layer` of a `depth`-layer model at the same relative depth in a model of n_layers:
    round(layer x n_layers / depth), kept within 1..n_layers - 1 (a decision after the last layer
    would save nothing).  A model of fewer than 2 layers has no such layer: ValueError."""
    if n_layers < 2:
        raise ValueError(f"the model has {n_layers} layer: a decision needs a layer below the last one")
    return min(max(1, round(layer * n_layers / depth)), n_layers - 1)


def preset(name: str, n_layers: int) -> QuickSilverConfig:
    """`paper`: the paper's halting rule (drift + entropy) with fusion, at the best point of its
    threshold grid (scripts/halting_grid.py; docs/quicksilver.md): the one point found within +0.2
    perplexity that saves work on WikiText-103 and C4, on context tokens, halted tokens' keys and
    values masked above their halt (thresholds, l_min and tau_fuse are our reading: the abstract gives
    none); Matryoshka widths off (every AMQ point costs FLOPs, its entropy checks; `--amq-layer` adds
    them); `fast`: qsjax's calibrated setting (context tokens only); `long`: context selection for
    long prompts (see below).

    Depth: `fast` and `long` were calibrated on SmolLM2-135M's 30 layers (cut-off after layer 25,
    selection after layer 8); on a model of n_layers they decide at the same relative depth
    (`scaled_layer`: round(25 L / 30), round(8 L / 30), within 1..L - 1), as `paper` does with L/2,
    rather than refuse every model but the one they were tuned on: the papers place these
    layers by depth (QuickSilver's l_min = L/4; FastKV, GemFilter an early-middle layer). At 30
    layers the rule gives the calibrated layers exactly; elsewhere they are a starting point, not a
    calibration. A model of one layer has no layer to decide after: ValueError."""
    if name == "paper":
        # SmolLM2-135M, strided 2048/512, first 4,096 tokens: 27.816 (-0.006) on C4 and 17.858 (+0.121)
        # on WikiText-103, 1.5% / 1.4% fewer FLOPs (docs/results/halting-grid)
        return QuickSilverConfig(scope="context", halt="drift", halt_min_layer=max(1, n_layers // 2), halt_drift=0.17,
                                 halt_entropy=3.0, kv_skip="mask", fuse_threshold=0.95)
    if name == "fast":
        # calibrated on SmolLM2-135M (30 layers), strided 2048/512, first 4,096 tokens of WikiText-103 test and
        # of the C4 sample: the deepest-saving cut-off within +0.2 perplexity on both (scripts/sweep.py)
        return QuickSilverConfig(scope="context", halt="cutoff", halt_cutoff_layer=scaled_layer(25, 30, n_layers),
                                 kv_skip="mask")
    if name == "long":
        # our reading of FastKV / GemFilter / SnapKV + StreamingLLM for SmolLM2-135M, calibrated with the tail
        # protocol 8192/512 on WikiText-103 and C4 and on passkey at 2,048-8,192 tokens (README, "Long
        # prompts"): after layer 8 of 30 (where the question's attention finds a needle best among the early
        # layers), 40% of the context keeps computing, at least 1,024 tokens (shorter prompts lose
        # nothing): three quarters of that budget the most recent tokens (long coherent text needs its
        # newest ~2,300 at 8,192), the rest the keys the last 16 context queries attend to most (max over
        # KV heads), pooled over 11 neighbours so that a selected key brings its neighbours
        return QuickSilverConfig(scope="context", halt="select", halt_cutoff_layer=scaled_layer(8, 30, n_layers),
                                 keep_top_k=0.4, select_signal="attention", select_queries=16, select_heads="max",
                                 select_pool=11, select_pool_kind="max", select_recent=0.75, select_min_keep=1024,
                                 kv_skip="mask")
    if name == "off":
        return OFF
    raise ValueError(f"unknown preset {name!r} (choose from paper, fast, long, off)")
