"""The long-prompt settings `scripts/bench_long.py` measures, by name: `long` (the preset) and the
frontier's points, one curve per policy and cut-off layer, and `truncate-2048` (the plain alternative:
dense qsjax on the last 2,048 tokens of each prompt).

Each setting is data: its policy `curve`, its `label` and either `quicksilver`, the QuickSilverConfig
fields it sets (over the preset named by "preset", else over the defaults; layer numbers are for the
default model's 30 layers and scale with the model's depth), or `truncate`, N: dense qsjax on the last
N tokens of every prompt (a passkey prompt keeps its instruction), every scored token of the tail
protocol seeing N tokens of context."""

from __future__ import annotations

import dataclasses

from qsjax.runtime.cli import UsageError
from qsjax.quicksilver.settings import preset

LAYERS = 30  # the layer numbers below are out of this many
LAYER_FIELDS = ("halt_cutoff_layer", "halt_cutoff_layer2")
HYBRID = "recent share + attention"
ATTENTION = "attention, 256 recent"
WINDOW = "recent window + attention"
LOCAL_HEAD = "local attention, 512-token head"
LOCAL = "local attention"


def long(**fields) -> dict:
    """The long preset (after layer 8, 40% of the context, 75% of it recent) with `fields` changed."""
    return {"preset": "long", **fields}


def recency(keep: float, cutoff: int) -> dict:
    """The newest share `keep` of the context keeps computing after layer `cutoff`."""
    return dict(halt="select", select_signal="recency", halt_cutoff_layer=cutoff, keep_top_k=keep)


def local(window: int, full: int = 512, prefix: int = 0, **fields) -> dict:
    """The long preset with local attention for far context: a window of `window` slots, the last
    `full` context tokens seeing everything, the first `prefix` tokens seen by all."""
    return long(local_window=window, local_full=full, local_prefix=prefix, **fields)


SETTINGS = {
    "long": dict(curve=HYBRID, label="c=8, 40%: 75% of it recent (long preset)", quicksilver=long()),
    "hybrid-40-r70": dict(curve=HYBRID, label="c=8, 40%: 70% of it recent", quicksilver=long(select_recent=0.7)),
    "hybrid-35-r80": dict(curve=HYBRID, label="c=8, 35%: 80% of it recent",
                          quicksilver=long(keep_top_k=0.35, select_recent=0.8)),
    "attention-25": dict(curve=ATTENTION, label="c=8, 25%", quicksilver=long(keep_top_k=0.25, select_recent=256)),
    "attention-50": dict(curve=ATTENTION, label="c=8, 50%", quicksilver=long(keep_top_k=0.5, select_recent=256)),
    "attention-c5": dict(curve=ATTENTION, label="c=5, 25%",
                         quicksilver=long(keep_top_k=0.25, select_recent=256, halt_cutoff_layer=5)),
    "hybrid-25": dict(curve=WINDOW, label="c=8, 25%: 1,536 recent", quicksilver=long(keep_top_k=0.25, select_recent=1536)),
    "hybrid-50": dict(curve=WINDOW, label="c=8, 50%: 2,048 recent", quicksilver=long(keep_top_k=0.5, select_recent=2048)),
    "recency-50-c10": dict(curve="recency", label="c=10, 50%", quicksilver=recency(0.5, 10)),
    "recency-25-c10": dict(curve="recency", label="c=10, 25%", quicksilver=recency(0.25, 10)),
    "recency-40-c2": dict(curve="recency", label="c=2, 40%", quicksilver=recency(0.4, 2)),
    "recency-30-c2": dict(curve="recency", label="c=2, 30%", quicksilver=recency(0.3, 2)),
    "local-512": dict(curve=LOCAL_HEAD, label="W=512, 1,024 full", quicksilver=local(512, 1024, 512)),
    "local-512-r256": dict(curve=LOCAL_HEAD, label="W=512, 256 full", quicksilver=local(512, 256, 512)),
    "local-512-r512": dict(curve=LOCAL_HEAD, label="W=512, 512 full", quicksilver=local(512, 512, 512)),
    "local-512-k30": dict(curve=LOCAL_HEAD, label="W=512, 1,024 full, 30% kept",
                          quicksilver=local(512, 1024, 512, keep_top_k=0.3)),
    "local-512-pyr": dict(curve=LOCAL_HEAD, label="W=512, 1,024 full, 20% after layer 16",
                          quicksilver=local(512, 1024, 512, halt_cutoff_layer2=16, keep_top_k2=0.2)),
    "local-256": dict(curve=LOCAL_HEAD, label="W=256, 1,024 full", quicksilver=local(256, 1024, 512)),
    "local-1024-p0": dict(curve=LOCAL, label="W=1,024, 512 full", quicksilver=local(1024)),
    "local-512-p0": dict(curve=LOCAL, label="W=512, 512 full", quicksilver=local(512)),
    "local-512-f16-p0": dict(curve=LOCAL, label="W=512, 16 full", quicksilver=local(512, full=16)),
    "truncate-2048": dict(curve="truncation (dense, last N tokens)", label="2,048 tokens", truncate=2048),
}


def truncation(name: str) -> int | None:
    """Setting `name`'s truncation length (None: a QuickSilver setting)."""
    return SETTINGS[name].get("truncate")


def check(names, *, truncation: bool = True) -> None:
    """UsageError for a name that is not a setting (or, with truncation=False, is a truncation)."""
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        raise UsageError(f"unknown setting {unknown[0]!r} (choose from {', '.join(SETTINGS)})")
    short = [s for s in names if "truncate" in SETTINGS[s]]
    if short and not truncation:
        raise UsageError(f"setting {short[0]!r} is a truncation; this script measures QuickSilver settings")


def config(name: str, L: int):
    """Setting `name`'s QuickSilverConfig for a model of L layers, or its truncation length."""
    if truncation(name) is not None:
        return truncation(name)
    fields = dict(SETTINGS[name]["quicksilver"])
    base = preset(fields.pop("preset", "off"), L)
    return dataclasses.replace(base, **{k: round(L * v / LAYERS) if k in LAYER_FIELDS else v for k, v in fields.items()})


def recorded(name: str, L: int) -> dict:
    """How a report records setting `name`: its policy curve, label, `quicksilver` (the whole
    QuickSilverConfig, as every report records it and --quicksilver-config replays it; null for a
    truncation) and `truncate` (the tokens a truncation keeps, else null)."""
    qs = config(name, L)
    truncated = isinstance(qs, int)
    return dict(policy=SETTINGS[name]["curve"], label=SETTINGS[name]["label"],
                quicksilver=None if truncated else dataclasses.asdict(qs), truncate=qs if truncated else None)


def upgraded(setting: dict) -> dict:
    """A setting as reports before `quicksilver`/`truncate` recorded it (one `config`: the fields, or
    {"truncate": N}), in today's shape; today's unchanged."""
    if "config" not in setting:
        return setting
    old = dict(setting)
    fields = old.pop("config")
    return {**old, "quicksilver": None if "truncate" in fields else fields, "truncate": fields.get("truncate")}
