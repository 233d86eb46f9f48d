"""QuickSilver's command-line options, shared by `qsjax.generate` and `qsjax.eval`.

`--quicksilver PRESET` starts from a preset (off, paper, fast, long); any mechanism flag overrides it.
Without `--halt`, the policy follows the flags given: `--halt-drift`/`--halt-entropy` mean the
paper's drift rule, `--keep-top-k` or any other selection flag (`--select-*`, `--halt-cutoff-layer2`,
`--keep-top-k2`) importance selection, `--halt-cutoff-layer` alone a depth cut-off.
"""

from __future__ import annotations

import dataclasses
import math
import re

from qsjax.runtime.cli import UsageError
from qsjax.quicksilver.settings import (HALT_POLICIES, KV_MODES, POOL_KINDS, SCOPES, SELECT_HEADS, SELECT_SIGNALS,
                                     QuickSilverConfig, preset)


def count_or_share(text: str) -> int | float:
    """A whole number (a count: 256) or a share below 1 (0.7)."""
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


# flag -> (config field, type)
FLAGS = {
    "--scope": ("scope", str),
    "--n-sink": ("n_sink", int),
    "--halt": ("halt", str),
    "--halt-drift": ("halt_drift", float),
    "--halt-entropy": ("halt_entropy", float),
    "--halt-min-layer": ("halt_min_layer", int),
    "--halt-cutoff-layer": ("halt_cutoff_layer", int),
    "--keep-top-k": ("keep_top_k", float),
    "--select-signal": ("select_signal", str),
    "--select-queries": ("select_queries", int),
    "--select-heads": ("select_heads", str),
    "--select-accumulate": ("select_accumulate", bool),
    "--select-pool": ("select_pool", int),
    "--select-pool-kind": ("select_pool_kind", str),
    "--select-recent": ("select_recent", count_or_share),
    "--select-min-keep": ("select_min_keep", int),
    "--halt-cutoff-layer2": ("halt_cutoff_layer2", int),
    "--keep-top-k2": ("keep_top_k2", float),
    "--local-window": ("local_window", int),
    "--local-full": ("local_full", int),
    "--local-prefix": ("local_prefix", int),
    "--kv-skip": ("kv_skip", str),
    "--kv-propagate-span": ("kv_propagate_span", int),
    "--fuse-threshold": ("fuse_threshold", float),
    "--amq-layer": ("amq_layer", int),
    "--amq-low": ("amq_low", float),
    "--amq-high": ("amq_high", float),
}
FIELD_FLAGS = {field: flag for flag, (field, _) in FLAGS.items()}
# arguments-only ranges: flag -> (lowest, highest) allowed (None: unbounded)
RANGES = {
    "--n-sink": (0, None), "--halt-min-layer": (1, None), "--halt-cutoff-layer": (1, None),
    "--halt-drift": (0, None), "--halt-entropy": (0, None), "--keep-top-k": (0, 1),
    "--kv-propagate-span": (0, None), "--fuse-threshold": (-1, 1), "--amq-layer": (1, None),
    "--amq-low": (0, None), "--amq-high": (0, None), "--select-queries": (1, None), "--select-pool": (0, None),
    "--select-recent": (0, None), "--select-min-keep": (0, None), "--halt-cutoff-layer2": (1, None), "--keep-top-k2": (0, 1),
    "--local-window": (1, None), "--local-full": (0, None), "--local-prefix": (0, None),
}  # fmt: skip
CHOICES = {"scope": SCOPES, "halt": HALT_POLICIES, "kv_skip": KV_MODES, "select_signal": SELECT_SIGNALS,
           "select_heads": SELECT_HEADS, "select_pool_kind": POOL_KINDS}
# importance selection's fields: any of them given without --halt means --halt select
SELECT_FIELDS = ("keep_top_k", "select_signal", "select_queries", "select_heads", "select_accumulate", "select_pool",
                 "select_pool_kind", "select_recent", "select_min_keep", "halt_cutoff_layer2", "keep_top_k2")


def add_quicksilver_args(parser) -> None:
    group = parser.add_argument_group("QuickSilver (off unless a preset or a mechanism flag is given)")
    group.add_argument("--quicksilver", default="off", choices=["off", "paper", "fast", "long"],
                       help="preset: paper = the paper's rule on every token, at qsjax's reading of its thresholds (see the "
                       "README); fast = qsjax's calibrated setting for short windows; long = context selection for long "
                       "prompts (no effect up to 1,024 context tokens)")
    for flag, (field, kind) in FLAGS.items():
        if kind is bool:
            group.add_argument(flag, dest=f"qs_{field}", action="store_const", const=True, default=None,
                               help=f"QuickSilverConfig.{field} = True")
            continue
        metavar = None if field in CHOICES else {int: "N", float: "X", count_or_share: "N|X"}[kind]
        group.add_argument(flag, dest=f"qs_{field}", type=kind, default=None, choices=CHOICES.get(field),
                           metavar=metavar, help=f"QuickSilverConfig.{field}")
    group.add_argument("--no-drift-test", action="store_true", help="drift rule: skip the drift test (entropy only)")
    group.add_argument("--no-entropy-test", action="store_true", help="drift rule: skip the entropy test (drift only)")
    group.add_argument("--masked-reference", action="store_true",
                       help="run every token through every layer and mask (the reference semantics) instead of compacting")


def check_quicksilver_args(args) -> None:
    """The checks that need only the arguments (run before the model loads): finite numbers in range.
    --fuse-threshold is a cosine similarity, so above 1 fusion could never happen."""
    for flag, (low, high) in RANGES.items():
        value = getattr(args, f"qs_{FLAGS[flag][0]}")
        if value is None:
            continue
        shown = "" if high is None else f" and <= {high}"
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            raise UsageError(f"{flag} must be >= {low}{shown}, got {value}")
    for flag in ("--keep-top-k", "--keep-top-k2"):
        if getattr(args, f"qs_{FLAGS[flag][0]}") == 0:
            raise UsageError(f"{flag} must be > 0 (the fraction of tokens that keep computing), got 0")
    quicksilver_from_args(args, None)  # combinations (e.g. importance selection needs --scope context)


def in_flag_words(message: str, implied: str | None) -> str:
    """A QuickSilverConfig message with its field names as the flags that set them."""
    names = "|".join(FIELD_FLAGS)

    def with_value(m):
        field, value = m.group(1), m.group(2)
        if field == "halt" and implied:
            return f"--halt {value} (implied by {implied})"
        return f"{FIELD_FLAGS[field]} {value}"

    message = re.sub(rf"(?<![-\w])({names})=(\S+)", with_value, message)
    return re.sub(rf"(?<![-\w])({names})(?![-\w])", lambda m: FIELD_FLAGS[m.group(1)], message)


def quicksilver_from_args(args, n_layers: int | None) -> QuickSilverConfig:
    """The QuickSilverConfig the options ask for; a bad combination is a UsageError in the flags'
    words.  `n_layers=None`: only the checks that do not depend on the model."""
    given = {field: getattr(args, f"qs_{field}") for _, (field, _) in FLAGS.items()
             if getattr(args, f"qs_{field}") is not None}
    if args.no_drift_test:
        given["halt_drift"] = None
    if args.no_entropy_test:
        given["halt_entropy"] = None
    if args.masked_reference:
        given["compact"] = False
    implied = None
    if "halt" not in given:
        chosen = [field for field in SELECT_FIELDS if field in given]
        if chosen:
            given["halt"], implied = "select", FIELD_FLAGS[chosen[0]]
        elif {"halt_drift", "halt_entropy"} & given.keys() or args.no_drift_test or args.no_entropy_test:
            given["halt"], implied = "drift", "the drift/entropy flags"
        elif "halt_cutoff_layer" in given:
            given["halt"], implied = "cutoff", "--halt-cutoff-layer"
    try:
        base = preset(args.quicksilver, n_layers or 1_000_000)
        qs = dataclasses.replace(base, **given)
        if n_layers is not None:
            qs.validate_for(n_layers)
    except ValueError as e:
        raise UsageError(f"QuickSilver options: {in_flag_words(str(e), implied)}") from None
    return qs
