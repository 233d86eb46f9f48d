"""The halting rule's threshold grid: drift + entropy halting (QuickSilver's rule) over tau_drift x
tau_H x l_min, with and without fusion, in scope all and context.

    python scripts/halting_grid.py --out halting-grid --data wikitext103 --max-eval-tokens 4096

Every point is the `paper` preset's halting (drift + entropy, relative drift) with its thresholds
replaced and Matryoshka quantization off; fusion, when on, at the preset's tau_fuse from l_min up.
`--scope`, `--fusion`, `--tau-drift`, `--tau-entropy` and `--min-layer` pick a part of the grid
(default: all of it, 9 x 4 x 2 points per scope and fusion setting). Evaluated as scripts/sweep.py
does (strided, --max-length 2048 --stride 512 by default): dense, then each point; writes
OUT/sweep.json (each row: every QuickSilverConfig field, perplexity and its change vs dense, the
executed-FLOP reduction, seconds, tokens halted), OUT/sweep.csv and the frontier plots
(`frontier_<data>.png`, one curve per scope / fusion / tau_H / l_min). `scripts/sweep.py --replot
--out OUT` redraws them. The points with calibrated Matryoshka views are pending (no calibrated
store is read here yet).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from sweep import check_args, run_sweep
from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli
from qsjax.quicksilver.settings import KV_MODES, SCOPES, QuickSilverConfig, preset

TAU_DRIFT = (0.045, 0.06, 0.08, 0.1, 0.13, 0.17, 0.22, 0.3, 0.4)
TAU_ENTROPY = (0.5, 1.15, 2.0, 3.0)  # bits
MIN_LAYER = ("L/4", "L/2")  # l_min, as a share of the model's depth
FUSION = ("off", "on")


class Point(NamedTuple):
    """One grid point: where the tests run (scope, l_min as "L/4"), its thresholds, fusion."""
    scope: str
    fusion: bool
    tau_entropy: float
    min_layer: str
    tau_drift: float

    def curve(self) -> str:
        """The frontier curve it belongs to (one per scope, fusion, tau_H and l_min)."""
        return f"{self.scope}{', fusion' if self.fusion else ''}: tau_H={self.tau_entropy:g}, l_min={self.min_layer}"

    def label(self) -> str:
        return f"tau_d={self.tau_drift:g}"


def min_layer(share: str, n_layers: int) -> int:
    """l_min for "L/4" or "L/2" on a model of n_layers (at least 1)."""
    return max(1, n_layers // int(share.removeprefix("L/")))


def config(point: Point, n_layers: int, kv_skip: str) -> QuickSilverConfig:
    """The `paper` preset with this point's halting thresholds, its scope and fusion, AMQ off."""
    paper = preset("paper", n_layers)
    return dataclasses.replace(paper, scope=point.scope, halt="drift", halt_drift=point.tau_drift,
                               halt_entropy=point.tau_entropy, halt_min_layer=min_layer(point.min_layer, n_layers),
                               fuse_threshold=paper.fuse_threshold if point.fusion else None, amq_layer=None,
                               kv_skip=kv_skip)


def grid(scopes=SCOPES, fusion=FUSION, tau_entropy=TAU_ENTROPY, min_layers=MIN_LAYER,
         tau_drift=TAU_DRIFT) -> list[Point]:
    """Every combination, curve by curve (each curve's points by tau_drift)."""
    return [Point(s, f == "on", h, m, d) for s in scopes for f in fusion for h in tau_entropy for m in min_layers
            for d in tau_drift]


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/halting_grid.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a Hugging Face model directory (default: the default model)")
    p.add_argument("--data", nargs="+", default=["wikitext103", "c4"], help="wikitext103, c4 or text files")
    p.add_argument("--out", default="halting-grid", help="the directory to write into (created)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--max-eval-tokens", type=int, default=4096)
    p.add_argument("--scope", nargs="+", choices=SCOPES, default=list(SCOPES))
    p.add_argument("--fusion", nargs="+", choices=FUSION, default=list(FUSION))
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


def main(argv=None) -> int:
    args = parse_args(argv)
    check_grid(args)
    check_args(args)
    points = grid(args.scope, args.fusion, args.tau_entropy, args.min_layer, args.tau_drift)
    fields = tuple(f.name for f in dataclasses.fields(QuickSilverConfig))

    def pick(n_layers: int):
        if n_layers < 2:
            raise UsageError(f"the model has {n_layers} layer: halting needs a layer below the last one")
        return [(p.curve(), p.label(), config(p, n_layers, args.kv_skip)) for p in points]

    run_sweep(args, pick, fields)
    return 0


if __name__ == "__main__":
    run_cli(main)
