"""The frontier figures: off-range points pinned to the edge they overflow, one style per policy;
a missing matplotlib is a usage error naming the flag that asked for a figure."""

import importlib.util

import pytest

from qsjax.runtime.cli import UsageError
from qsjax.evaluation.plots import Axes, Point, frontier_figure, pinned, require, styles


def hide_matplotlib(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))


def test_require_names_the_flag_when_matplotlib_is_missing(monkeypatch):
    require("--plots")  # installed for the tests: nothing raised
    hide_matplotlib(monkeypatch)
    with pytest.raises(UsageError, match=r"--plots needs matplotlib \(pip install -e '.\[plot\]'\)"):
        require("--plots")


def test_pinned_clips_to_the_edge_it_overflows():
    assert pinned(0.5, 0.0, 2.0) == (0.5, 0)
    assert pinned(3e9, 0.0, 2.0) == (2.0, 1)
    assert pinned(-7.0, -0.25, 2.0) == (-0.25, -1)


def test_every_policy_gets_its_own_colour_and_marker():
    policies = [f"policy {i}" for i in range(40)]
    style = styles(policies + policies[:3])  # repeats name the same policy
    assert list(style) == policies
    assert len({(tuple(colour), marker) for colour, marker in style.values()}) == len(policies)


def test_frontier_figure_is_a_png_with_off_range_points():
    points = [Point("a", "x", 1.2, 0.1), Point("a", "y", 1.5, 3e9), Point("b", "z", 9.0, -4.0)]
    axes = Axes("speed-up", "change", (0.5, 2.5), (-0.25, 2.0), band=(-0.25, 0.2))
    assert frontier_figure(points, axes, "t", Point("dense", "dense", 1.0, 0.0)).startswith(b"\x89PNG")
