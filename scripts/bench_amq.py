"""The Matryoshka width table: perplexity of every width, every token from layer 1 at that width.

    python scripts/bench_amq.py --data c4 --group-size 64 --json docs/results/matryoshka/c4_g64.json

Each row is written as soon as it is measured; rows already in --json (the same data, groups and
protocol) are kept, so `--rows` may add rows run by run (`commands` lists the runs).

Rows (strided 2,048/512 over the first 4,096 tokens unless told otherwise):
- dense: the float model;
- naive r: today's store (symmetric int8 per output channel, views by round-to-nearest top bits);
- alone r: every linear on its own r-bit min-max grid with the same groups (not a view of int8);
- nested min-max r: the nested group-wise grid, views = the int8 codes' top r bits, no calibration;
- calibrated r: the same grid with the clipping of the store beside the model (`calibrate-amq`).
The AMQ rows are what `python -m qsjax.eval --amq-layer 1` gives with --amq-low/--amq-high 0/0
(8 bits), 0/1e9 (4) and 1e9/1e9 (2): by default computed by the dense program on the dequantized
views (the same products, far faster than the per-width gathers), `--through-quicksilver` runs
AMQ itself; "alone" runs the dense program on the replaced weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from benchlib import add_protocol, check_json_path, check_positive, check_protocol, machine, protocol_report, windows_of
from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli, write_output

THRESHOLDS = {8: (0.0, 0.0), 4: (0.0, 1e9), 2: (1e9, 1e9)}


def perplexity(model, stream, windows, qs=None) -> float:
    from qsjax.evaluation.perplexity import Scorer, evaluate
    from qsjax.quicksilver.scorer import QuickSilverScorer, evaluate_quicksilver

    if qs is None:
        return evaluate(Scorer(model), stream, windows, progress=False).perplexity
    return evaluate_quicksilver(QuickSilverScorer(model, qs), stream, windows, progress=False)[0].perplexity


def amq_rows(model, stream, windows, store, label: str, through_quicksilver: bool = False) -> dict:
    """Each width's perplexity with every block's linear layers at that width. By default the dense
    program runs the dequantized view W^(r) (what AMQ computes when every token takes width r, in a
    fraction of the time); `through_quicksilver` runs AMQ itself (`--amq-layer 1` and thresholds)."""
    from qsjax.quicksilver.decoding.steps import prepare
    from qsjax.quicksilver.settings import QuickSilverConfig

    out = {}
    for r, (low, high) in THRESHOLDS.items():
        qs = QuickSilverConfig(amq_layer=1, amq_low=low, amq_high=high)
        if through_quicksilver:
            out[f"{label} {r}"] = perplexity(prepare(model, qs, store), stream, windows, qs)
        else:
            out[f"{label} {r}"] = perplexity(replaced(model, lambda w, layer, name: view(w, r, store, layer, name)),
                                             stream, windows)
        print(f"{label} {r}: {out[f'{label} {r}']:.4f}", file=sys.stderr, flush=True)
    return out


def view(w, bits: int, store, layer: int, name: str):
    """W^(r) of a weight under a store (None: naive)."""
    from qsjax.quicksilver.mechanisms.matryoshka import dequantize, quantize

    return dequantize(quantize(w) if store is None else store.quantizer(layer, name)(w), bits, w.dtype)


def replaced(model, f):
    """The model with every block's linear weights w replaced by f(w, layer, name)."""
    from qsjax.dense.model import Model
    from qsjax.dense.modules import Linear

    from flax import nnx

    module = nnx.clone(model.module())  # a copy: assigning to a merged module's weights changes the model's own
    for layer, blk in enumerate(module.blocks):
        for name, child in vars(blk).items():
            if isinstance(child, Linear):
                child.w[...] = f(child.w[...], layer, name).astype(child.w[...].dtype)
    return dataclasses.replace(Model.from_module(module), mesh=model.mesh)


def alone(model, bits: int, group: int):
    """The model with every block's linear weights on their own r-bit grid (dequantized)."""
    from qsjax.quicksilver.mechanisms.nested import quantize_alone

    return replaced(model, lambda w, layer, name: quantize_alone(w, bits, group))


class MinMax:
    """A store with no learned clipping (gamma = beta = 1)."""

    def __init__(self, group: int):
        self.group = group

    def quantizer(self, layer, name):
        from qsjax.quicksilver.calibration import nested_quantizer

        return nested_quantizer(None, self.group)


ROWS = ("dense", "naive", "alone", "minmax", "calibrated")


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/bench_amq.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a Hugging Face model directory (default: the default model)")
    p.add_argument("--data", default="c4", help="wikitext103, c4 or a text file (default c4)")
    p.add_argument("--group-size", type=int, default=64, help="input rows per scale group (default 64)")
    add_protocol(p)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows among {', '.join(ROWS)} (default all)")
    p.add_argument("--through-quicksilver", action="store_true",
                   help="the AMQ rows through QuickSilver's AMQ path (slow) instead of the dense program on W^(r)")
    p.add_argument("--json", required=True, help="the report (rows already there by the same protocol are kept)")
    return p.parse_args(argv)


def check_args(args) -> None:
    check_protocol(args)
    check_positive(args, "group_size")
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        raise UsageError(f"--rows: unknown row {unknown[0]!r} (choose from {', '.join(ROWS)})")
    check_json_path(args.json)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.checkpoints.tokenizer import load_tokenizer
    from qsjax.evaluation.data import read_text, resolve_data, tokenize
    from qsjax.quicksilver import amqstore
    from qsjax.weights import resolve_model

    model_dir = resolve_model(args.model)
    model = load_model(model_dir, "float32")
    stream = tokenize(load_tokenizer(model_dir), read_text(resolve_data(args.data)), args.max_eval_tokens)
    windows = windows_of(args, len(stream))
    g = args.group_size
    store = amqstore.load(model_dir, g) if "calibrated" in args.rows.split(",") else None
    report = {"model": model_dir.name, "data": args.data, "group_size": g,
              "protocol": protocol_report(args, len(stream)),
              "every_token_from_layer": 1, "machine": machine(),
              "amq_rows_through": "quicksilver" if args.through_quicksilver else "dense program on W^(r)",
              "perplexity": {}, "calibration": None, "commands": []}
    if os.path.exists(args.json):  # rows measured before, by the same protocol, are kept
        before = json.load(open(args.json))
        if all(before.get(k) == report[k] for k in ("data", "group_size", "protocol", "amq_rows_through")):
            report["machine"] = before.get("machine", report["machine"])
            report.update(perplexity=before["perplexity"], calibration=before.get("calibration"),
                          commands=before.get("commands", []))
    report["commands"].append("python scripts/bench_amq.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if store is not None:
        report["calibration"] = store.meta["settings"]

    def record(rows: dict):
        report["perplexity"].update(rows)
        write_output("--json", args.json, json.dumps(report, indent=2) + "\n")  # atomic: after every row

    for row in args.rows.split(","):
        if row == "dense":
            record({"dense": perplexity(model, stream, windows)})
        elif row == "naive":
            record(amq_rows(model, stream, windows, None, "naive", args.through_quicksilver))
        elif row == "alone":
            for r in (4, 2):
                record({f"alone {r}": perplexity(alone(model, r, g), stream, windows)})
        elif row == "minmax":
            record(amq_rows(model, stream, windows, MinMax(g), "nested min-max", args.through_quicksilver))
        elif row == "calibrated" and store is not None:
            record(amq_rows(model, stream, windows, store, "calibrated", args.through_quicksilver))
        print(json.dumps(report["perplexity"]), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
