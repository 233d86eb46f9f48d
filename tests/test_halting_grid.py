"""scripts/halting_grid.py: the issue's threshold grid on the `paper` preset's rule, its exact and
stop-rule skips, a run end to end on a tiny model, and AMQ with the calibrated store."""

from test_benchmarks import run_script, script_module


def test_halting_grid_is_the_issues_grid_on_the_paper_presets_rule():
    """9 tau_drift from 0.045 to 0.4 x 4 tau_H x l_min in {L/4, L/2}, with and without fusion, in both
    scopes; each point is the `paper` preset with its thresholds replaced and AMQ off."""
    import dataclasses

    from qsjax.quicksilver.settings import preset

    grid = script_module("halting_grid")
    assert grid.TAU_DRIFT == (0.045, 0.06, 0.08, 0.1, 0.13, 0.17, 0.22, 0.3, 0.4)
    assert grid.TAU_ENTROPY == (0.5, 1.15, 2.0, 3.0)
    points = grid.grid()
    assert len(points) == len(set(points)) == 9 * 4 * 2 * 2 * 2
    assert len({p.curve() for p in points}) == 4 * 2 * 2 * 2  # one curve per scope, fusion, tau_H, l_min
    assert [grid.min_layer(m, 30) for m in grid.MIN_LAYER] == [7, 15]
    paper = preset("paper", 30)
    fused = grid.config(grid.Point("context", True, False, 2.0, "L/2", 0.13), 30, "mask")
    assert fused == dataclasses.replace(paper, scope="context", halt_drift=0.13, halt_entropy=2.0, halt_min_layer=15,
                                        amq_layer=None, kv_skip="mask")
    quantized = grid.config(grid.Point("context", False, True, 2.0, "L/2", 0.13), 30, "mask")
    assert (quantized.amq_layer, quantized.amq_low, quantized.amq_high) == (16, 0.0, 2.3)  # AMQ's best point
    assert len(grid.grid(amq=("off", "on"))) == 2 * len(points)
    assert [p.tau_drift for p in points[:9]] == [0.13, 0.1, 0.08, 0.06, 0.045, 0.17, 0.22, 0.3, 0.4]  # middle, down, up
    plain = grid.config(grid.Point("all", False, False, 0.5, "L/4", 0.06), 30, "zero")
    assert plain.fuse_threshold is None and plain.amq_layer is None and plain.halt_min_layer == 7
    assert plain.kv_skip == "zero" and plain.scope == "all"
    # the preset sits at the grid's best point (docs/quicksilver.md, "The halting rule's threshold grid")
    assert paper == grid.config(grid.Point("context", True, False, 3.0, "L/2", 0.17), 30, "mask")
    assert grid.min_layer("L/4", 2) == 1


def test_halting_grid_skips_below_a_point_that_halted_nothing_and_above_a_wrecked_one():
    from qsjax.quicksilver.settings import QuickSilverConfig

    grid = script_module("halting_grid")

    def row(policy, tau_drift, perplexity, halted):
        return dict(policy=policy, perplexity=perplexity, stats={"tokens_halted": halted},
                    settings={"quicksilver": {"halt_drift": tau_drift}})

    rows = [dict(policy="dense", perplexity=10.0), row("a", 0.13, 10.0, 0), row("b", 0.13, 10.5, 3),
            row("b", 0.17, 20.5, 90)]
    at = lambda d: QuickSilverConfig(halt="drift", halt_drift=d, halt_entropy=1.0)
    why = grid.skip(2.0)
    assert "halts nothing" in why("a", at(0.1), rows) and why("a", at(0.17), rows) is None
    assert why("b", at(0.1), rows) is None and why("b", at(0.15), rows) is None  # below 0.17: not skipped
    assert "beyond --stop-above" in why("b", at(0.22), rows)
    assert grid.skip(None)("b", at(0.22), rows) is None  # --stop-above 0: run them all
    assert why("c", at(0.1), rows) is None  # another curve's rows do not count


def test_halting_grid_runs_end_to_end_on_a_tiny_model(tmp_path):
    """tau_drift 0 halts nothing (dense perplexity exactly); tau_drift and tau_H far above any value
    halt every in-scope token after l_min; every row carries its whole QuickSilverConfig."""
    import csv
    import dataclasses
    import json

    from conftest import save_tiny_llama_with_tokenizer
    from qsjax.evaluation.perplexity import strided_windows
    from qsjax.quicksilver.settings import QuickSilverConfig

    sentences = [f"the {w} sat on the mat number {i} and looked at the {w}" for i in range(40) for w in ("cat", "dog")]
    (tmp_path / "model").mkdir()
    save_tiny_llama_with_tokenizer(tmp_path / "model", sentences, n_layers=4)
    (tmp_path / "text.txt").write_text(" ".join(sentences))
    grid = script_module("halting_grid")
    out = tmp_path / "out"
    assert grid.main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "text.txt"), "--out", str(out),
                      "--max-length", "32", "--stride", "16", "--max-eval-tokens", "64", "--scope", "all",
                      "--fusion", "off", "--tau-drift", "0", "1e9", "--tau-entropy", "1e9", "--min-layer", "L/4"]) == 0
    dense, every, none = json.loads((out / "sweep.json").read_text())["rows"]  # from the middle tau_drift down
    assert none["perplexity"] == dense["perplexity"] and none["stats"]["tokens_halted"] == 0
    windows = strided_windows(64, 32, 16)  # every token but each window's 4 sinks halts after layer 1
    assert every["stats"]["tokens_halted"] == sum(w.length - 4 for w in windows) and every["perplexity"] != dense["perplexity"]
    assert every["settings"]["quicksilver"] == dataclasses.asdict(grid.config(grid.Point("all", False, False, 1e9, "L/4",
                                                                                          1e9), 4, "mask"))
    assert (out / "frontier_text.png").exists()  # a data file's plots are named by its stem
    header = next(csv.reader((out / "sweep.csv").open()))
    assert {f.name for f in dataclasses.fields(QuickSilverConfig)} | {"tokens_halted"} <= set(header)


def test_halting_grid_with_amq_needs_and_uses_the_calibrated_store(tmp_path):
    import json

    import numpy as np

    from conftest import save_tiny_llama_with_tokenizer
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.quicksilver import amqstore
    from qsjax.quicksilver.calibration import Settings

    sentences = [f"the {w} sat on the mat number {i} and looked at the {w}" for i in range(40) for w in ("cat", "dog")]
    (tmp_path / "model").mkdir()
    save_tiny_llama_with_tokenizer(tmp_path / "model", sentences, n_layers=4)
    (tmp_path / "text.txt").write_text(" ".join(sentences))
    args = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "text.txt"), "--max-length", "32",
            "--stride", "16", "--max-eval-tokens", "64", "--scope", "context", "--fusion", "off", "--amq", "on",
            "--group-size", "32", "--tau-drift", "1e9", "--tau-entropy", "1e9", "--min-layer", "L/4"]
    status, stdout, stderr = run_script("halting_grid.py", *args, "--out", str(tmp_path / "none"))
    assert status == 2 and "no AMQ store of group size 32" in stderr and not (tmp_path / "none").exists(), stderr
    tokens = np.random.default_rng(0).integers(0, 96, (2, 16)).astype(np.int32)
    store = amqstore.build(load_model(tmp_path / "model"), tokens, Settings(group_size=32, steps=5, rank=8), progress=False)
    amqstore.save(store, tmp_path / "model")
    assert script_module("halting_grid").main([*args, "--out", str(tmp_path / "out")]) == 0
    _, row = json.loads((tmp_path / "out" / "sweep.json").read_text())["rows"]
    assert row["weights"]["amq_store"] == "calibrated" and row["weights"]["amq_group_size"] == 32
    qs = row["settings"]["quicksilver"]
    assert (qs["amq_layer"], qs["amq_low"], qs["amq_high"]) == (3, 0.0, 2.3) and row["stats"]["tokens_halted"] > 0
    assert row["stats"]["bits_histogram"]["4"] + row["stats"]["bits_histogram"]["8"] > 0
