"""QuickSilver's command-line options, shared by `qsjax.generate` and `qsjax.eval`.

`--quicksilver PRESET` starts from a preset (off, paper, fast); any mechanism flag overrides it.
Without `--halt`, the policy follows the flags given: `--halt-drift`/`--halt-entropy` mean the
paper's drift rule, `--keep-top-k` importance selection, `--halt-cutoff-layer` alone a depth cut-off.
"""

from __future__ import annotations

import dataclasses

from qsjax.cli import UsageError
from qsjax.quicksilver.config import HALT_POLICIES, KV_MODES, SCOPES, SELECT_SIGNALS, QuickSilverConfig, preset

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
    "--kv-skip": ("kv_skip", str),
    "--kv-propagate-span": ("kv_propagate_span", int),
    "--fuse-threshold": ("fuse_threshold", float),
    "--amq-layer": ("amq_layer", int),
    "--amq-low": ("amq_low", float),
    "--amq-high": ("amq_high", float),
}
CHOICES = {"scope": SCOPES, "halt": HALT_POLICIES, "kv_skip": KV_MODES, "select_signal": SELECT_SIGNALS}


def add_quicksilver_args(parser) -> None:
    group = parser.add_argument_group("QuickSilver (off unless a preset or a mechanism flag is given)")
    group.add_argument("--quicksilver", default="off", choices=["off", "paper", "fast"],
                       help="preset: paper = the paper's rule and thresholds on every token; fast = qsjax's calibrated setting")
    for flag, (field, kind) in FLAGS.items():
        metavar = None if field in CHOICES else {int: "N", float: "X"}[kind]
        group.add_argument(flag, dest=f"qs_{field}", type=kind, default=None, choices=CHOICES.get(field),
                           metavar=metavar, help=f"QuickSilverConfig.{field}")
    group.add_argument("--no-drift-test", action="store_true", help="drift rule: skip the drift test (entropy only)")
    group.add_argument("--no-entropy-test", action="store_true", help="drift rule: skip the entropy test (drift only)")
    group.add_argument("--masked-reference", action="store_true",
                       help="run every token through every layer and mask (the reference semantics) instead of compacting")


def quicksilver_from_args(args, n_layers: int) -> QuickSilverConfig:
    """The QuickSilverConfig the options ask for; a bad combination is a UsageError."""
    given = {field: getattr(args, f"qs_{field}") for _, (field, _) in FLAGS.items()
             if getattr(args, f"qs_{field}") is not None}
    if args.no_drift_test:
        given["halt_drift"] = None
    if args.no_entropy_test:
        given["halt_entropy"] = None
    if args.masked_reference:
        given["compact"] = False
    if "halt" not in given:
        if "keep_top_k" in given or given.get("select_signal"):
            given["halt"] = "select"
        elif {"halt_drift", "halt_entropy"} & given.keys() or args.no_drift_test or args.no_entropy_test:
            given["halt"] = "drift"
        elif "halt_cutoff_layer" in given:
            given["halt"] = "cutoff"
    try:
        base = preset(args.quicksilver, n_layers)
        qs = dataclasses.replace(base, **given)
        qs.validate_for(n_layers)
    except ValueError as e:
        raise UsageError(f"QuickSilver options: {e}") from None
    return qs
