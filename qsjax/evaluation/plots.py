"""The figures qsjax draws: quality/speed frontiers and needle-in-a-haystack grids (needs matplotlib).

A frontier puts one point per setting on linear axes over the range that matters; points beyond it
are pinned to the edge they overflow (a triangle pointing that way) and labelled with their value, so
one ruined setting cannot squash the rest into a sliver. Each policy has its own colour and marker,
the legend sits outside the axes, and a quality budget (e.g. +0.2 perplexity) is a shaded band.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import itertools
from pathlib import Path

import numpy as np

from qsjax.runtime.cli import UsageError

MARKERS = "osD^vP*Xph<>"


@dataclasses.dataclass(frozen=True)
class Point:
    policy: str  # the curve it belongs to
    label: str  # the setting, e.g. "c=10"
    x: float
    y: float


@dataclasses.dataclass(frozen=True)
class Axes:
    """What a frontier shows: the labels, the visible range (off-range points are pinned to its edge),
    and the band of acceptable quality (None: no band)."""

    xlabel: str
    ylabel: str
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    band: tuple[float, float] | None = None
    band_label: str = ""


def require(flag: str) -> None:
    """Raise UsageError if matplotlib is missing: checked before slow work, so that a run asked to
    draw (`flag`) does not measure for an hour and then fail."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"{flag} needs matplotlib (pip install -e '.[plot]')")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def styles(policies) -> dict:
    """One (colour, marker) per policy, never repeated: tab10 colours crossed with markers."""
    plt = pyplot()
    pairs = zip(itertools.cycle(MARKERS), itertools.cycle(range(10)))
    return {p: (plt.cm.tab10(c), m) for p, (m, c) in zip(dict.fromkeys(policies), pairs)}


def pinned(value: float, lo: float, hi: float) -> tuple[float, int]:
    """The value clipped into [lo, hi] and which edge it overflowed (-1 low, +1 high, 0 none)."""
    return (lo, -1) if value < lo else (hi, 1) if value > hi else (value, 0)


def frontier_figure(points: list[Point], axes: Axes, title: str, reference: Point | None = None) -> bytes:
    """One curve per policy (points sorted by x) -> PNG bytes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 5.2))
    (x0, x1), (y0, y1) = axes.xlim, axes.ylim
    if axes.band is not None:
        ax.axhspan(*axes.band, color="tab:green", alpha=0.12, lw=0, label=axes.band_label or None)
    style = styles(p.policy for p in points)
    crowd: dict = {}  # pinned points per edge position, so their labels stack instead of overlapping
    for policy, (colour, marker) in style.items():
        pts = sorted((p for p in points if p.policy == policy), key=lambda p: p.x)
        xs, ys = [], []
        for p in pts:
            (x, ex), (y, ey) = pinned(p.x, x0, x1), pinned(p.y, y0, y1)
            xs.append(x)
            ys.append(y)
            if ex or ey:  # off the visible range: a triangle at the edge, labelled with the true value(s)
                m = "^" if ey > 0 else "v" if ey < 0 else ">" if ex > 0 else "<"
                ax.scatter(x, y, marker=m, s=70, color=colour, clip_on=False, zorder=3)
                text = ", ".join(([f"x={p.x:.3g}"] if ex else []) + ([f"y={p.y:+.3g}"] if ey else []))
                spot = (round(12 * (x - x0) / (x1 - x0)), ey)
                n = crowd[spot] = crowd.get(spot, -1) + 1
                ax.annotate(text, (x, y), textcoords="offset points", fontsize=6, color=colour, annotation_clip=False,
                            xytext=(5, (-12 if ey > 0 else 5) - 8 * n if ey >= 0 else 5 + 8 * n))
        ax.plot(xs, ys, marker=marker, color=colour, ms=5, lw=1, label=policy, clip_on=False)
    if reference is not None:
        ax.scatter(reference.x, reference.y, marker="*", s=160, color="black", zorder=4, label=reference.label)
    ax.set(xlim=axes.xlim, ylim=axes.ylim, xlabel=axes.xlabel, ylabel=axes.ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return png(fig)


def sweep_points(rows: list[dict], data: str, key: str) -> list[Point]:
    """A sweep's rows (`scripts/sweep.py`'s sweep.json) of one data set as frontier points: x = `key`
    (flops_reduction in %, or speedup), y = perplexity change."""
    scale = 100 if key == "flops_reduction" else 1
    return [Point(r["policy"], r["label"], scale * r[key], r["ppl_increase"]) for r in rows
            if r["data"] == data and r["policy"] != "dense"]


def sweep_frontiers(rows: list[dict], data: str) -> dict[str, bytes]:
    """A sweep's two frontiers of one data set, on linear axes over the range that matters:
    {"frontier_<data>.png": perplexity change vs executed FLOPs saved, "frontier_wallclock_<data>.png":
    vs the scoring loop's speed-up over dense qsjax} -> PNG bytes each; a data file is named by its stem."""
    figures, tag = {}, Path(data).stem
    for key, name, xlabel, xlim in (
        ("flops_reduction", f"frontier_{tag}.png", "executed FLOPs saved vs dense (% of whole windows)", (-5, 25)),
        ("speedup", f"frontier_wallclock_{tag}.png", "wall-clock speed-up vs dense qsjax (scoring loop, x)",
         (0.5, max(1.5, min(4.0, 1.1 * max(r["speedup"] for r in rows if r["data"] == data))))),
    ):
        axes = Axes(xlabel, "perplexity change vs dense", xlim, (-0.25, 2.0), band=(-0.25, 0.2), band_label="within +0.2")
        dense = Point("dense", "dense", 0.0 if key == "flops_reduction" else 1.0, 0.0)
        figures[name] = frontier_figure(sweep_points(rows, data, key), axes, f"QuickSilver frontier, {data}", dense)
    return figures


GRIDS_PER_ROW = 4


def passkey_grids(runs: list[tuple[str, float, np.ndarray]], lengths: list[int], depths: list[float]) -> bytes:
    """One heatmap per run (name, overall accuracy, accuracy per length x depth), side by side, at most
    `GRIDS_PER_ROW` to a row: length x depth, colour = accuracy -> PNG bytes."""
    plt = pyplot()
    rows, cols = -(-len(runs) // GRIDS_PER_ROW), min(len(runs), GRIDS_PER_ROW)
    size = (1.2 + 1.1 * len(depths) * cols, (0.9 + 0.5 * len(lengths)) * rows)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
    for ax in axes.flat[len(runs):]:
        ax.set_axis_off()
    for ax, (name, overall, acc) in zip(axes.flat, runs):
        image = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        for (r, c), value in np.ndenumerate(acc):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set(xlabel="needle depth", title=f"{name}: accuracy {overall:.2f}")
    for row in axes:
        row[0].set_ylabel("length (tokens)")
    fig.colorbar(image, ax=list(axes.flat), label="accuracy")
    return png(fig)


def decision_map(halt_layer, fused, bits, labels: list[str], n_layers: int) -> bytes:
    """Per-token decisions of one stretch of a window: the layers each token ran (green) with fusion
    marked, and its Matryoshka bits.  halt_layer, fused, bits [n] (one entry per token) -> PNG bytes"""
    plt = pyplot()
    halt, fused, bits = np.asarray(halt_layer), np.asarray(fused, bool), np.asarray(bits)
    computed = np.arange(1, n_layers + 1)[:, None] <= halt[None, :]  # [L, n]: layer l ran for the token
    fig, axes = plt.subplots(2, 1, figsize=(14, 5), gridspec_kw={"height_ratios": [4, 1]})
    axes[0].imshow(computed, aspect="auto", cmap="Greens", origin="lower", interpolation="nearest", vmin=0, vmax=1.5)
    axes[0].scatter(np.nonzero(fused)[0], halt[fused] - 1, marker="x", color="red", s=12, label="retired by fusion")
    axes[0].set(ylabel="layer", title="layers each token ran (green), fusion (x)", xticks=[])
    axes[1].imshow(bits[None, :], aspect="auto", cmap="viridis", vmin=2, vmax=8)
    axes[1].set(yticks=[], title="Matryoshka bits")
    axes[1].set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    fig.tight_layout()
    return png(fig)


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()
