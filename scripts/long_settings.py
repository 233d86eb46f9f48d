"""The long-prompt settings `scripts/bench_long.py` measures, by name: `long` (the preset) and the
frontier's points, one curve per policy and cut-off layer, and `truncate-2048` (the plain alternative:
dense qsjax on the last 2,048 tokens of each prompt)."""

from __future__ import annotations

import dataclasses

from qsjax.runtime.cli import UsageError
from qsjax.quicksilver.settings import QuickSilverConfig, preset


def recency(k, c):
    """The newest share k of the context keeps computing after layer c."""
    return QuickSilverConfig(halt="select", select_signal="recency", halt_cutoff_layer=c, keep_top_k=k)


def hybrid(L, k, recent, cutoff=8):
    """The long preset's votes after layer `cutoff` (of 30) keeping k of the context, the most recent
    first: `recent` tokens, or below 1 that share of the budget."""
    return dataclasses.replace(preset("long", L), keep_top_k=k, select_recent=recent,
                               halt_cutoff_layer=round(L * cutoff / 30))


def local(L, window, full=512, prefix=0, **changes):
    """The long preset with local attention for far context: a window of `window` slots, the last
    `full` context tokens seeing everything, the first `prefix` tokens seen by all (and `changes` to
    the preset's other fields)."""
    return dataclasses.replace(preset("long", L), local_window=window, local_full=full, local_prefix=prefix, **changes)


# name -> (policy curve, label, config for a model of L layers (L -> QuickSilverConfig), or an int N for
# truncation, the plain alternative: dense qsjax on the last N tokens of every prompt (a passkey prompt
# keeps its instruction), every scored token of the tail protocol seeing N tokens of context)
SETTINGS = {
    "long": ("recent share + attention", "c=8, 40%: 75% of it recent (long preset)", lambda L: preset("long", L)),
    "hybrid-40-r70": ("recent share + attention", "c=8, 40%: 70% of it recent", lambda L: hybrid(L, 0.4, 0.7)),
    "hybrid-35-r80": ("recent share + attention", "c=8, 35%: 80% of it recent", lambda L: hybrid(L, 0.35, 0.8)),
    "attention-25": ("attention, 256 recent", "c=8, 25%", lambda L: hybrid(L, 0.25, 256)),
    "attention-50": ("attention, 256 recent", "c=8, 50%", lambda L: hybrid(L, 0.5, 256)),
    "attention-c5": ("attention, 256 recent", "c=5, 25%", lambda L: hybrid(L, 0.25, 256, cutoff=5)),
    "hybrid-25": ("recent window + attention", "c=8, 25%: 1,536 recent", lambda L: hybrid(L, 0.25, 1536)),
    "hybrid-50": ("recent window + attention", "c=8, 50%: 2,048 recent", lambda L: hybrid(L, 0.5, 2048)),
    "recency-50-c10": ("recency", "c=10, 50%", lambda L: recency(0.5, L // 3)),
    "recency-25-c10": ("recency", "c=10, 25%", lambda L: recency(0.25, L // 3)),
    "recency-40-c2": ("recency", "c=2, 40%", lambda L: recency(0.4, round(L * 2 / 30))),
    "recency-30-c2": ("recency", "c=2, 30%", lambda L: recency(0.3, round(L * 2 / 30))),
    "local-512": ("local attention, 512-token head", "W=512, 1,024 full", lambda L: local(L, 512, 1024, 512)),
    "local-512-r256": ("local attention, 512-token head", "W=512, 256 full", lambda L: local(L, 512, 256, 512)),
    "local-512-r512": ("local attention, 512-token head", "W=512, 512 full", lambda L: local(L, 512, 512, 512)),
    "local-512-k30": ("local attention, 512-token head", "W=512, 1,024 full, 30% kept",
                      lambda L: local(L, 512, 1024, 512, keep_top_k=0.3)),
    "local-512-pyr": ("local attention, 512-token head", "W=512, 1,024 full, 20% after layer 16",
                      lambda L: local(L, 512, 1024, 512, halt_cutoff_layer2=round(L * 16 / 30), keep_top_k2=0.2)),
    "local-256": ("local attention, 512-token head", "W=256, 1,024 full", lambda L: local(L, 256, 1024, 512)),
    "local-1024-p0": ("local attention", "W=1,024, 512 full", lambda L: local(L, 1024)),
    "local-512-p0": ("local attention", "W=512, 512 full", lambda L: local(L, 512)),
    "local-512-f16-p0": ("local attention", "W=512, 16 full", lambda L: local(L, 512, full=16)),
    "truncate-2048": ("truncation (dense, last N tokens)", "2,048 tokens", 2048),
}


def check(names, *, truncation: bool = True) -> None:
    """UsageError for a name that is not a setting (or, with truncation=False, is a truncation)."""
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        raise UsageError(f"unknown setting {unknown[0]!r} (choose from {', '.join(SETTINGS)})")
    short = [s for s in names if isinstance(SETTINGS[s][2], int)]
    if short and not truncation:
        raise UsageError(f"setting {short[0]!r} is a truncation; this script measures QuickSilver settings")


def config(name: str, L: int):
    """Setting `name`'s QuickSilverConfig for a model of L layers, or its truncation length."""
    make = SETTINGS[name][2]
    return make if isinstance(make, int) else make(L)


def recorded(name: str, L: int) -> dict:
    """How a report records setting `name`: its policy curve, label and config."""
    qs = config(name, L)
    return dict(policy=SETTINGS[name][0], label=SETTINGS[name][1],
                config={"truncate": qs} if isinstance(qs, int) else dataclasses.asdict(qs))
