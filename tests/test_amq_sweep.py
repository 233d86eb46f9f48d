"""scripts/amq_sweep.py: AMQ's entropy thresholds swept with a store; its checks, its rows and plots."""

import json

import pytest

from test_benchmarks import run_script, script_module


@pytest.mark.parametrize(("args", "message"), [
    (["--pairs", "2/1"], "--pairs 2/1: give LOW/HIGH"),
    (["--pairs", "1"], "--pairs 1: give LOW/HIGH"),
    (["--pairs", "0/1", "0/1.0"], "--pairs: a pair is given twice"),
    (["--amq-layer", "L/3"], "--amq-layer L/3: give L/2+1 or a layer number"),
    (["--store", "exact"], "invalid choice"),
    (["--out", "README.md"], "--out README.md is a file"),
    (["--out", "/nonexistent-dir", "--replot"], "--replot: cannot read a sweep"),
])
def test_argument_errors(args, message):
    status, stdout, stderr = run_script("amq_sweep.py", *args)
    assert status == 2 and stdout == "", stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr


def test_points_are_amq_alone_at_the_papers_layer():
    from qsjax.quicksilver.settings import QuickSilverConfig

    sweep = script_module("amq_sweep")
    point = sweep.Point("calibrated", "context", "L/2+1", 0.4, 1.5)
    assert sweep.config(point, 30) == QuickSilverConfig(scope="context", amq_layer=16, amq_low=0.4, amq_high=1.5)
    assert sweep.config(point._replace(layer="1"), 30).amq_layer == 1
    assert point.curve() == "context, l_q=L/2+1, calibrated" and point.label() == "0.4/1.5"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 4-layer Llama with a tokenizer, and a text file."""
    from conftest import save_tiny_llama_with_tokenizer

    path = tmp_path_factory.mktemp("amq-sweep")
    sentences = [f"the {w} sat on the mat number {i} and looked at the {w}" for i in range(40) for w in ("cat", "dog")]
    (path / "model").mkdir()
    save_tiny_llama_with_tokenizer(path / "model", sentences, n_layers=4)
    (path / "text.txt").write_text(" ".join(sentences))
    return path


def sweep_args(tiny, out, *more):
    return ["--model", str(tiny / "model"), "--data", str(tiny / "text.txt"), "--out", str(out), "--max-length", "32",
            "--stride", "16", "--max-eval-tokens", "64", "--scope", "all", *more]


def test_runs_end_to_end_on_a_tiny_model(tiny, tmp_path):
    """0/0: every token at 8 bits; 1e9/1e9: every in-scope token at 2 bits, fewer bytes read; each row
    names the store that ran; the bytes frontier is drawn, and redrawn by --replot."""
    sweep = script_module("amq_sweep")
    out = tmp_path / "out"
    assert sweep.main(sweep_args(tiny, out, "--store", "naive", "--amq-layer", "2", "--pairs", "0/0", "1e9/1e9")) == 0
    dense, eight, two = json.loads((out / "sweep.json").read_text())["rows"]
    assert dense["policy"] == "dense" and eight["weights"]["amq_store"] == two["weights"]["amq_store"] == "naive"
    assert eight["stats"]["bits_histogram"]["2"] == 0 and two["stats"]["bits_histogram"]["2"] > 0
    assert eight["stats"]["weight_bytes_per_token"]["saved_vs_8_bits"] == 0
    assert two["stats"]["weight_bytes_per_token"]["saved_vs_8_bits"] > 0
    assert two["settings"]["quicksilver"]["amq_layer"] == 2 and eight["perplexity"] != two["perplexity"]
    picture = out / "frontier_bytes_text.png"
    assert picture.exists()
    picture.unlink()
    assert sweep.main(["--out", str(out), "--replot"]) == 0 and picture.exists()


def test_the_calibrated_store_is_required_and_used(tiny, tmp_path):
    import numpy as np

    from qsjax.checkpoints.hf_params import load_model
    from qsjax.quicksilver import amqstore
    from qsjax.quicksilver.calibration import Settings

    status, stdout, stderr = run_script("amq_sweep.py", *sweep_args(tiny, tmp_path / "none", "--group-size", "32"))
    assert status == 2 and "no AMQ store of group size 32" in stderr and not (tmp_path / "none").exists(), stderr
    tokens = np.random.default_rng(0).integers(0, 96, (2, 16)).astype(np.int32)
    store = amqstore.build(load_model(tiny / "model"), tokens, Settings(group_size=32, steps=5, rank=8), progress=False)
    amqstore.save(store, tiny / "model")
    sweep = script_module("amq_sweep")
    out = tmp_path / "out"
    assert sweep.main(sweep_args(tiny, out, "--group-size", "32", "--amq-layer", "L/2+1", "--pairs", "0/0")) == 0
    row = json.loads((out / "sweep.json").read_text())["rows"][1]
    assert row["weights"]["amq_store"] == "calibrated" and row["weights"]["amq_group_size"] == 32
    assert row["settings"]["quicksilver"]["amq_layer"] == 3
