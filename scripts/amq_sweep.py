"""Adaptive Matryoshka quantization's frontier: the entropy thresholds swept, with the calibrated
store (or the naive one), in scope all and context.

    python scripts/amq_sweep.py --out amq --data wikitext103 --max-eval-tokens 4096

Every point is AMQ alone (no halting, no fusion): from layer l_q (`--amq-layer`: L/2+1, the
first-read `paper` preset's, and/or 1) each token in scope takes 8 bits above tau_high bits of entropy, 2
below tau_low, 4 between (`--pairs LOW/HIGH ...`; 0/0 puts every token at 8 bits). `--store
calibrated` quantizes with the store `python -m qsjax.weights calibrate-amq --group-size G` wrote
beside the model (an error if there is none), `--store naive` with the per-channel slicing.
Evaluated as scripts/sweep.py does (strided, --max-length 2048 --stride 512 by default): dense,
then each point; writes OUT/sweep.json (each row: every QuickSilverConfig field, perplexity and its
change vs dense, the executed-FLOP reduction, `stats.bits_histogram`, `stats.weight_bytes_per_token`
and the store that ran, `weights`), OUT/sweep.csv, the FLOP frontiers (`frontier_<data>.png`) and
`frontier_bytes_<data>.png` (perplexity change vs the weight bytes a token reads, saved against
float32 dense). `--replot` redraws the figures of OUT/sweep.json; `--entropy` prints, instead of
evaluating, the quantiles of the entropy each token's width is chosen from (on entering l_q, the
dense model, the first window of each data set): what the thresholds are picked from.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import NamedTuple

from benchlib import add_protocol
from sweep import check_args, plot_frontiers, run_sweep
from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli, write_output
from qsjax.quicksilver.settings import SCOPES, QuickSilverConfig

LAYERS = ("L/2+1", "1")
PAIRS = ("0/0", "0/0.9", "0/1.5", "0/2.3", "0.4/1.5", "1/3")  # from the entropy's quartiles at L/2+1
STORES = ("calibrated", "naive")
QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


class Point(NamedTuple):
    """One point: the store, the scope, l_q ("L/2+1" or "1"), tau_low and tau_high (bits)."""
    store: str
    scope: str
    layer: str
    low: float
    high: float

    def curve(self) -> str:
        return f"{self.scope}, l_q={self.layer}, {self.store}"

    def label(self) -> str:
        return f"{self.low:g}/{self.high:g}"


def amq_layer(layer: str, n_layers: int) -> int:
    """l_q for "L/2+1" or a layer number."""
    return n_layers // 2 + 1 if layer == "L/2+1" else int(layer)


def config(point: Point, n_layers: int) -> QuickSilverConfig:
    return QuickSilverConfig(scope=point.scope, amq_layer=amq_layer(point.layer, n_layers), amq_low=point.low,
                             amq_high=point.high)


def pair(text: str) -> tuple[float, float]:
    """"LOW/HIGH" -> (low, high), checked by QuickSilverConfig's own ranges."""
    try:
        low, high = (float(v) for v in text.split("/"))
        QuickSilverConfig(amq_layer=1, amq_low=low, amq_high=high)
    except ValueError as e:
        raise UsageError(f"--pairs {text}: give LOW/HIGH, two entropies in bits with LOW <= HIGH ({e})") from None
    return low, high


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/amq_sweep.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a Hugging Face model directory (default: the default model)")
    p.add_argument("--data", nargs="+", default=["wikitext103", "c4"], help="wikitext103, c4 or text files")
    p.add_argument("--out", default="amq-frontier", help="the directory to write into (created)")
    add_protocol(p, max_eval_tokens=4096)
    p.add_argument("--store", choices=STORES, default="calibrated")
    p.add_argument("--group-size", type=int, default=64, help="the calibrated store's group size (default 64)")
    p.add_argument("--scope", nargs="+", choices=SCOPES, default=list(SCOPES))
    p.add_argument("--amq-layer", nargs="+", default=list(LAYERS), help="l_q: L/2+1 or a layer number")
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), help="tau_low/tau_high in bits")
    p.add_argument("--entropy", action="store_true", help="only print the entropy's quantiles at each l_q")
    p.add_argument("--replot", action="store_true", help="only redraw the figures from OUT/sweep.json")
    args = p.parse_args(argv)
    args.heatmap = None
    return args


def check_points(args) -> None:
    """--pairs (each once, LOW <= HIGH) into args.thresholds; --amq-layer: L/2+1 or a positive number."""
    args.thresholds = [pair(t) for t in args.pairs]
    if len(set(args.thresholds)) < len(args.thresholds):
        raise UsageError("--pairs: a pair is given twice")
    for layer in args.amq_layer:
        if layer != "L/2+1" and not (layer.isdigit() and int(layer) >= 1):
            raise UsageError(f"--amq-layer {layer}: give L/2+1 or a layer number (1 or more)")


def bytes_frontier(rows: list[dict], data: str) -> bytes:
    """Perplexity change vs weight bytes read per token saved against float32 dense (%)."""
    from qsjax.evaluation.plots import Axes, Point as Mark, frontier_figure

    points = [Mark(r["policy"], r["label"], 100 * r["stats"]["weight_bytes_per_token"]["saved_vs_float32"],
                   r["ppl_increase"]) for r in rows if r["data"] == data and r["policy"] != "dense"]
    axes = Axes("blocks' weight bytes read per token, saved vs float32 dense (%)", "perplexity change vs dense",
                (0, 100), (-0.25, 3.0), band=(-0.25, 0.2), band_label="within +0.2")
    return frontier_figure(points, axes, f"AMQ frontier, {data}", Mark("dense", "dense", 0.0, 0.0))


def plot_all(rows: list[dict], out: Path, flops: bool = True) -> None:
    """frontier_bytes_<data>.png, and (flops) the FLOP frontiers, of every data set in rows."""
    for data in dict.fromkeys(r["data"] for r in rows):
        for path in plot_frontiers(rows, data, out) if flops else []:
            print(f"wrote {path}", file=sys.stderr)
        path = out / f"frontier_bytes_{Path(data).stem}.png"
        write_output("--out", str(path), bytes_frontier(rows, data))
        print(f"wrote {path}", file=sys.stderr)


def entropy_quantiles(args, layers: list[str]) -> dict:
    """{data: {l_q: quantiles}} of the entropy (bits) on entering l_q, the dense model, the first window."""
    import jax.numpy as jnp
    import numpy as np

    from qsjax.checkpoints.load import load_model_checked, load_tokenizer_checked
    from qsjax.dense import blocks
    from qsjax.dense.model import Layout, block
    from qsjax.evaluation.data import read_text, resolve_data, tokenize
    from qsjax.quicksilver.mechanisms.halting import entropy_bits
    from qsjax.weights import resolve_model

    model_dir = resolve_model(args.model)
    model, tokenizer = load_model_checked(args.model, model_dir, "float32"), load_tokenizer_checked(args.model, model_dir)
    module = model.module()
    wanted = {amq_layer(la, module.cfg.n_layers): la for la in layers}
    out = {}
    for data in args.data:
        tokens = jnp.asarray(tokenize(tokenizer, read_text(resolve_data(data)), args.max_length))[None]  # [1, T]
        w = Layout.left_padded(module.cfg, jnp.zeros(1, jnp.int32), tokens.shape[1])
        x, out[data] = blocks.embed(module, tokens, w.positions), {}
        for layer in range(1, max(wanted) + 1):
            if layer in wanted:
                h = np.asarray(entropy_bits(blocks.lm_logits(module, x)))[0]  # [T]
                out[data][wanted[layer]] = {f"q{round(100 * q)}": float(v) for q, v in zip(QUANTILES, np.quantile(h, QUANTILES))}
            x, _ = block(module.blocks[layer - 1], x, w)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    check_points(args)
    check_args(args)
    out = Path(args.out)
    if args.replot:
        plot_all(args.rows, out)
        return 0
    from qsjax.checkpoints.load import read_config
    from qsjax.quicksilver import amqstore
    from qsjax.weights import resolve_model

    model_dir = resolve_model(args.model)
    n_layers = read_config(args.model, model_dir).n_layers
    for layer in args.amq_layer:
        if not 1 <= amq_layer(layer, n_layers) <= n_layers:
            raise UsageError(f"--amq-layer {layer}: the model has {n_layers} layers")
    if args.entropy:
        print(json.dumps(entropy_quantiles(args, args.amq_layer), indent=1))
        return 0
    store = amqstore.load(model_dir, args.group_size) if args.store == "calibrated" else None
    if args.store == "calibrated" and store is None:
        raise UsageError(f"--store calibrated: no AMQ store of group size {args.group_size} beside the model; "
                         f"build it with `python -m qsjax.weights calibrate-amq --group-size {args.group_size}`")
    points = [Point(args.store, s, la, lo, hi) for la in args.amq_layer for s in args.scope for lo, hi in args.thresholds]
    fields = tuple(f.name for f in dataclasses.fields(QuickSilverConfig))
    rows = run_sweep(args, lambda n: [(p.curve(), p.label(), config(p, n)) for p in points], fields, store)
    try:
        plot_all(rows, out, flops=False)  # run_sweep drew the FLOP frontiers
    except ImportError:
        pass  # run_sweep said so
    return 0


if __name__ == "__main__":
    run_cli(main)
