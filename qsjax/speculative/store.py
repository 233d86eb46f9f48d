"""The skip set a model drafts with, stored beside its weights: `<model dir>/self-draft.json`,
written by `python -m qsjax.speculative.search`, read by `python -m qsjax.generate --self-speculation`.

    {"format": "qsjax self-draft 1", "n_layers": L,
     "skip": "attn:8-9;mlp:3-7,13",            the set drafting uses (settings.parse_sublayers' syntax)
     "skipped": 0.21, "agreement": 0.71,       its share of the layers' weights, its one-draft agreement
     "searched_on": {...},                     the text, its size, the search's options
     "curve": [{"skip": ..., "skipped": ..., "agreement": ..., "accepted": [K = 1..6]}, ...]}

The set only decides the speed: drafts are verified by the full model, so a stale or poor set never
changes the output.
"""

from __future__ import annotations

import json
from pathlib import Path

from qsjax.dense.model import Sublayers
from qsjax.runtime.cli import UsageError
from qsjax.speculative.settings import format_sublayers, parse_sublayers

FILE = "self-draft.json"
FORMAT = "qsjax self-draft 1"
COMMAND = "python -m qsjax.speculative.search"


class StoreError(UsageError):
    """No usable stored set: missing or damaged (one line, naming the command that makes it)."""


def store_path(model_dir) -> Path:
    return Path(model_dir) / FILE


def point_json(point) -> dict:
    """A search.Point as the store writes it."""
    return {"skip": format_sublayers(point.skip), "skipped": point.skipped, "agreement": point.agreement,
            "accepted": list(point.accepted)}


def store_json(curve, chosen, n_layers: int, searched_on: dict) -> dict:
    """The store's content: the chosen point of the search's curve, and the curve."""
    return {"format": FORMAT, "n_layers": n_layers, **point_json(chosen), "searched_on": searched_on,
            "curve": [point_json(p) for p in curve]}


def load_skip(model_dir, n_layers: int, model_arg: str | None = None) -> Sublayers:
    """The stored set of the model in `model_dir` (n_layers layers) -> Sublayers; StoreError when
    there is none or it cannot be used. model_arg: the --model the user gave (named in the hint)."""
    path = store_path(model_dir)
    make = COMMAND + (f" --model {model_arg}" if model_arg else "")
    if not path.is_file():
        raise StoreError(f"--self-speculation: no skip set is stored for this model ({path} is missing); make one with "
                         f"`{make}` (a few minutes), or give the set with --skip-sublayers")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if record.get("n_layers") != n_layers:
            raise ValueError(f"made for {record.get('n_layers')} layers, the model has {n_layers}")
        if not isinstance(record.get("skip"), str):
            raise ValueError('no "skip" set')
        skip = parse_sublayers(record["skip"])
        if not all(1 <= l <= n_layers for l in skip.attention | skip.mlp):
            raise ValueError(f"layers outside 1..{n_layers}")
    except (OSError, UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise StoreError(f"--self-speculation: {path} cannot be used ({e}); make it again with `{make}`") from None
    return skip
