"""The halting rule's threshold grid: drift + entropy halting (QuickSilver's rule) over tau_drift x
tau_H x l_min, with and without fusion, with and without calibrated AMQ, in scope all and context.

    python scripts/halting_grid.py --out halting-grid --data wikitext103 --max-eval-tokens 4096

Every point is the `paper` preset's halting (drift + entropy, relative drift) with its thresholds
replaced; fusion, when on, at the preset's tau_fuse from l_min up; AMQ off, or on with the
calibrated store beside the model (`python -m qsjax.weights calibrate-amq`) at AMQ's best point
within +0.2 (docs/results/amq-frontier: tau_low 0, tau_high 2.3 bits, from l_q = L/2+1).
`--scope`, `--fusion`, `--amq`, `--tau-drift`, `--tau-entropy` and `--min-layer` pick a part of
the grid (default: all of it but AMQ, 9 x 4 x 2 points per scope and fusion setting).

The thresholds are arguments of the compiled program (`ThresholdScorer`), so a curve family
compiles once. Each curve runs from its middle tau_drift down, then up; the points below one that
halted no token (exactly the unhalted run: no saving) and above one past --stop-above x dense
perplexity (default 2; 0 runs them) are listed in sweep.json's `skipped`, with the reason
(`skip`). Evaluated as scripts/sweep.py does (strided, --max-length 2048 --stride 512 by default;
`--protocol tail`: windows scoring only their last --stride tokens): dense, then each point;
writes OUT/sweep.json (each row: every QuickSilverConfig field, perplexity and its change vs
dense, the executed-FLOP reduction, seconds, tokens halted), OUT/sweep.csv and the frontier plots
(`frontier_<data>.png`, one curve per scope / fusion / AMQ / tau_H / l_min). `scripts/sweep.py
--replot --out OUT` redraws them.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from benchlib import add_protocol
from sweep import check_args, run_sweep
from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli
from qsjax.quicksilver.settings import KV_MODES, SCOPES, QuickSilverConfig, preset

TAU_DRIFT = (0.045, 0.06, 0.08, 0.1, 0.13, 0.17, 0.22, 0.3, 0.4)
TAU_ENTROPY = (0.5, 1.15, 2.0, 3.0)  # bits
MIN_LAYER = ("L/4", "L/2")  # l_min, as a share of the model's depth
FUSION = ("off", "on")
AMQ = ("off", "on")
AMQ_AT = (0.0, 2.3)  # tau_low, tau_high from l_q = L/2+1: AMQ's best point within +0.2 (amq-frontier)


class Point(NamedTuple):
    """One grid point: where the tests run (scope, l_min as "L/4"), its thresholds, fusion, AMQ."""
    scope: str
    fusion: bool
    amq: bool
    tau_entropy: float
    min_layer: str
    tau_drift: float

    def curve(self) -> str:
        """The frontier curve it belongs to (one per scope, fusion, AMQ, tau_H and l_min)."""
        return (f"{self.scope}{', fusion' if self.fusion else ''}{', AMQ' if self.amq else ''}: "
                f"tau_H={self.tau_entropy:g}, l_min={self.min_layer}")

    def label(self) -> str:
        return f"tau_d={self.tau_drift:g}"


def min_layer(share: str, n_layers: int) -> int:
    """l_min for "L/4" or "L/2" on a model of n_layers (at least 1)."""
    return max(1, n_layers // int(share.removeprefix("L/")))


def config(point: Point, n_layers: int, kv_skip: str) -> QuickSilverConfig:
    """The `paper` preset with this point's halting thresholds, its scope, fusion and AMQ (`AMQ_AT`)."""
    paper = preset("paper", n_layers)
    low, high = AMQ_AT
    amq = dict(amq_layer=n_layers // 2 + 1, amq_low=low, amq_high=high) if point.amq else dict(amq_layer=None)
    return dataclasses.replace(paper, scope=point.scope, halt="drift", halt_drift=point.tau_drift,
                               halt_entropy=point.tau_entropy, halt_min_layer=min_layer(point.min_layer, n_layers),
                               fuse_threshold=paper.fuse_threshold if point.fusion else None, kv_skip=kv_skip, **amq)


def grid(scopes=SCOPES, fusion=FUSION, tau_entropy=TAU_ENTROPY, min_layers=MIN_LAYER,
         tau_drift=TAU_DRIFT, amq=("off",)) -> list[Point]:
    """Every combination, curve by curve; each curve's tau_drift from its middle value down, then
    up from there (the order `skip` needs to spare the points it can)."""
    ordered = sorted(tau_drift)
    middle = len(ordered) // 2
    order = ordered[middle::-1] + ordered[middle + 1:]
    return [Point(s, f == "on", a == "on", h, m, d) for s in scopes for f in fusion for a in amq
            for h in tau_entropy for m in min_layers for d in order]


def skip(stop_above: float | None):
    """The points of a curve not worth running, given the rows run so far (`run_sweep`'s skip):
    - below a tau_drift that halted no token (exact: with no token halted, every state is the
      unhalted run's, and a lower threshold on the same states halts none either; so the point is
      the unhalted run, perplexity and all, plus its checks: it saves no work);
    - above a tau_drift whose perplexity exceeded stop_above x dense (a stop rule, not a proof: in
      the strided runs before it, scope all's perplexity went from 105 to 2e5 to 6e8 past 0.17)."""

    def why(policy, qs, rows):
        dense = rows[0]["perplexity"]
        run = [(r["settings"]["quicksilver"]["halt_drift"], r) for r in rows if r["policy"] == policy]
        if any(d >= qs.halt_drift and r["stats"]["tokens_halted"] == 0 for d, r in run):
            return "halts nothing: a higher tau_drift halted no token"
        if stop_above and any(d <= qs.halt_drift and not r["perplexity"] <= stop_above * dense for d, r in run):
            return f"beyond --stop-above: a lower tau_drift exceeded {stop_above:g}x dense perplexity"
        return None

    return why


class Scorers:
    """One `ThresholdScorer` per setting but the thresholds (scope, fusion, AMQ, l_min): each
    compiles its programs once for every (tau_drift, tau_H) of its curves."""

    def __init__(self):
        self.setting, self.scorer = None, None  # one held at a time: curves come in order

    def __call__(self, model, qs, store):
        from qsjax.quicksilver.scorer import ThresholdScorer

        setting = dataclasses.replace(qs, halt_drift=0.0, halt_entropy=0.0)
        if setting != self.setting:
            self.setting, self.scorer = setting, ThresholdScorer(model, qs, store)
        return self.scorer.at(qs)


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/halting_grid.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a Hugging Face model directory (default: the default model)")
    p.add_argument("--data", nargs="+", default=["wikitext103", "c4"], help="wikitext103, c4 or text files")
    p.add_argument("--out", default="halting-grid", help="the directory to write into (created)")
    add_protocol(p, max_eval_tokens=4096)
    p.add_argument("--scope", nargs="+", choices=SCOPES, default=list(SCOPES))
    p.add_argument("--fusion", nargs="+", choices=FUSION, default=list(FUSION))
    p.add_argument("--amq", nargs="+", choices=AMQ, default=["off"],
                   help="AMQ off, or on with the calibrated store (default off)")
    p.add_argument("--group-size", type=int, default=64, help="the calibrated store's group size (default 64)")
    p.add_argument("--stop-above", type=float, default=2.0,
                   help="skip a curve's further points once one exceeds this many times dense perplexity "
                        "(default 2; 0: run them all)")
    p.add_argument("--tau-drift", nargs="+", type=float, default=list(TAU_DRIFT))
    p.add_argument("--tau-entropy", nargs="+", type=float, default=list(TAU_ENTROPY), help="bits")
    p.add_argument("--min-layer", nargs="+", choices=MIN_LAYER, default=list(MIN_LAYER), help="l_min")
    p.add_argument("--kv-skip", choices=KV_MODES, default="mask",
                   help="a halted token's K/V above its halt (default mask: the sweep's drift points)")
    args = p.parse_args(argv)
    args.replot = False
    return args


def check_grid(args) -> None:
    """The thresholds: non-negative, finite (QuickSilverConfig's own ranges), each given once."""
    for flag in ("tau_drift", "tau_entropy"):
        values = getattr(args, flag)
        try:
            for value in values:
                QuickSilverConfig(halt="drift", **{"halt_drift" if flag == "tau_drift" else "halt_entropy": value})
        except ValueError as e:
            raise UsageError(f"--{flag.replace('_', '-')}: {e}") from None
        if len(set(values)) < len(values):
            raise UsageError(f"--{flag.replace('_', '-')}: a value is given twice")
    if not (args.stop_above == 0 or args.stop_above > 1):
        raise UsageError(f"--stop-above {args.stop_above:g}: give 0 (never stop) or a ratio above 1")


def main(argv=None) -> int:
    args = parse_args(argv)
    check_grid(args)
    check_args(args)
    points = grid(args.scope, args.fusion, args.tau_entropy, args.min_layer, args.tau_drift, args.amq)
    store = None
    if "on" in args.amq:
        from qsjax.quicksilver import amqstore
        from qsjax.weights import resolve_model

        store = amqstore.load(resolve_model(args.model), args.group_size)
        if store is None:
            raise UsageError(f"--amq on: no AMQ store of group size {args.group_size} beside the model; "
                             f"build it with python -m qsjax.weights calibrate-amq --group-size {args.group_size}")
    fields = tuple(f.name for f in dataclasses.fields(QuickSilverConfig))

    def pick(n_layers: int):
        if n_layers < 2:
            raise UsageError(f"the model has {n_layers} layer: halting needs a layer below the last one")
        return [(p.curve(), p.label(), config(p, n_layers, args.kv_skip)) for p in points]

    run_sweep(args, pick, fields, store, Scorers(), skip(args.stop_above or None))
    return 0


if __name__ == "__main__":
    run_cli(main)
