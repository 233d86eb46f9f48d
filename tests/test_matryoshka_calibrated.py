"""The calibrated AMQ store: nested views, calibration's determinism, the checksummed store, its use."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from qsjax.quicksilver import amqstore
from qsjax.quicksilver.calibration import Settings, calibrate_weight, nested_quantizer
from qsjax.quicksilver.mechanisms import nested
from qsjax.quicksilver.mechanisms.matryoshka import dequantize, matryoshka_linear

ROOT = Path(__file__).resolve().parent.parent
TINY = Settings(group_size=32, steps=5, rank=8)
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "A small model reads a small text, one token at a time."]


@pytest.fixture
def weight(rng):
    return jnp.asarray(rng.normal(0, 0.05, (128, 48)).astype(np.float32))


def test_each_narrower_view_is_the_top_bits_of_the_wider_ones_codes(weight):
    q = nested_quantizer(None, 32)(weight)
    assert q.codes.dtype == jnp.int8 and q.scale.shape == q.zero.shape == (3, 4, 48)  # per width, group, column
    c8, c4, c2 = (np.asarray(nested.view_codes(q.codes, r)) for r in (8, 4, 2))
    np.testing.assert_array_equal(c8, np.asarray(q.codes))
    np.testing.assert_array_equal(c4, c8 >> 4)
    np.testing.assert_array_equal(c2, c4 >> 2)
    assert c4.min() >= -8 and c4.max() <= 7 and c2.min() >= -2 and c2.max() <= 1


def test_nested_views_are_uniform_grids_over_the_group_range(weight):
    """8 bits: within half a step; r bits: within half of the r-bit step (plus the int8 rounding)."""
    q = nested_quantizer(None, 32)(weight)
    step = np.repeat(np.asarray(q.scale[0]), 32, axis=0)  # [D_in, D_out]
    for r in (8, 4, 2):
        err = np.abs(np.asarray(dequantize(q, r)) - np.asarray(weight))
        assert (err <= step * (2 ** (8 - r) / 2 + 0.5) + 1e-6).all(), r


def test_per_token_widths_use_the_nested_views(weight, rng):
    q = nested_quantizer(None, 64)(weight)
    x = jnp.asarray(rng.normal(0, 1, (3, 128)).astype(np.float32))
    y = matryoshka_linear(x, q, jnp.array([8, 4, 2]))
    for i, r in enumerate((8, 4, 2)):
        np.testing.assert_allclose(y[i], x[i] @ dequantize(q, r), rtol=1e-5, atol=1e-5)


def test_calibration_is_deterministic_and_lowers_the_objective(weight, rng):
    x = rng.normal(0, 1, (256, 128)).astype(np.float32) * np.linspace(0.2, 3, 128, dtype=np.float32)
    gram = x.T @ x / len(x)
    a, b = (calibrate_weight(weight, gram, Settings(group_size=32, steps=30, rank=16)) for _ in range(2))
    assert a.clip.keys() == b.clip.keys() == {"gamma", "beta", "step4", "offset4", "step2", "offset2"}
    for k in a.clip:
        np.testing.assert_array_equal(a.clip[k], b.clip[k])
    assert a.after == b.after
    assert ((0 < a.clip["gamma"]) & (a.clip["gamma"] <= 1)).all() and ((0 < a.clip["beta"]) & (a.clip["beta"] <= 1)).all()
    assert sum(x / y for x, y in zip(a.after, a.before)) < 3  # below min-max's (each term 1 there)


def test_the_widths_weight_steers_the_objective(weight, rng):
    """lambda = (0, 0, 1) fits the 2-bit view alone: its error falls, while the wider views end worse
    than when every width is weighed alike (the 2-bit view has its own step and offset, so it gains
    little from having the clipping to itself)."""
    x = rng.normal(0, 1, (256, 128)).astype(np.float32) * np.linspace(0.2, 3, 128, dtype=np.float32)
    gram = x.T @ x / len(x)
    alike, int2 = (calibrate_weight(weight, gram, Settings(group_size=32, steps=30, rank=16, widths_weight=lam))
                   for lam in ((1.0, 1.0, 1.0), (0.0, 0.0, 1.0)))
    assert int2.after[2] < int2.before[2] and all(a < b for a, b in zip(alike.after, alike.before))
    assert int2.after[0] > alike.after[0] and int2.after[1] > alike.after[1]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A tiny Llama with a tokenizer and a calibrated store of group 32."""
    from conftest import save_tiny_llama_with_tokenizer

    from qsjax.checkpoints.hf_params import load_model

    path = save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("amq"), SENTENCES)
    amqstore.save(amqstore.build(load_model(path), calibration_tokens(), TINY, progress=False), path)
    return path


def calibration_tokens():
    return np.random.default_rng(0).integers(0, 96, (2, 16)).astype(np.int32)


def test_store_round_trip_and_determinism(store_dir):
    from qsjax.checkpoints.hf_params import load_model

    loaded = amqstore.load(store_dir, 32)
    again = amqstore.build(load_model(store_dir), calibration_tokens(), TINY, progress=False)
    assert loaded.to_bytes() == again.to_bytes()  # the same text, the same store, byte for byte
    assert amqstore.load(store_dir, 64) is None  # no store of that group size


def test_a_damaged_store_is_detected(store_dir, tmp_path):
    import shutil

    path = tmp_path / "model"
    shutil.copytree(store_dir, path)
    store = amqstore.store_path(path, 32)
    data = bytearray(store.read_bytes())
    data[len(data) // 2] ^= 1
    store.write_bytes(bytes(data))
    with pytest.raises(amqstore.StoreError, match="damaged"):
        amqstore.load(path, 32)
    Path(str(store) + ".sha256").unlink()
    with pytest.raises(amqstore.StoreError, match="checksum"):
        amqstore.load(path, 32)


def test_prepare_uses_the_store(store_dir):
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.quicksilver.decoding.steps import prepare
    from qsjax.quicksilver.settings import QuickSilverConfig

    model = load_model(store_dir)
    qs = QuickSilverConfig(amq_layer=1)
    calibrated = amqstore.weights_report(prepare(model, qs, amqstore.load(store_dir, 32)))
    naive = amqstore.weights_report(prepare(model, qs))
    assert (calibrated["amq_store"], calibrated["amq_group_size"]) == ("calibrated", 32)
    assert (naive["amq_store"], naive["amq_group_size"]) == ("naive", None)
    assert amqstore.weights_report(model)["bytes"] > 3 * naive["bytes"] / 2  # int8 codes, float embeddings


def run(module, *args, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QSJAX_COMPILATION_CACHE": "off", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


def test_eval_reports_the_store_that_ran(store_dir, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("the cat sat on the mat. " * 20, encoding="utf-8")
    out = tmp_path / "r.json"
    common = ["--data", data, "--max-length", 16, "--stride", 8, "--max-eval-tokens", 48, "--amq-layer", 1,
              "--no-progress", "--json", out]
    proc = run("qsjax.eval", "--model", store_dir, *common)
    assert proc.returncode == 0, proc.stderr
    weights = json.loads(out.read_text())["weights"]
    assert (weights["amq_store"], weights["amq_group_size"]) == ("calibrated", 32) and weights["bytes"] > 0
    damaged = amqstore.store_path(store_dir, 32)
    good = damaged.read_bytes()
    try:
        damaged.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        proc = run("qsjax.eval", "--model", store_dir, *common)
        assert proc.returncode == 2 and proc.stderr.startswith("error: AMQ store") and "damaged" in proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
    finally:
        damaged.write_bytes(good)


def test_calibrate_command_error_paths(store_dir, tmp_path):
    for args, message in [(["--group-size", 48], "does not divide"), (["--steps", 0], "--steps must be"),
                          (["--block-steps", -1], "--block-steps must be"),
                          (["--group-size", 0], "--group-size must be"),
                          (["--widths-weight", "1,1"], "--widths-weight: give three non-negative numbers"),
                          (["--widths-weight", "0,0,0"], "--widths-weight: give three non-negative numbers"),
                          (["--widths-weight", "1,-1,1"], "--widths-weight: give three non-negative numbers"),
                          (["--widths-weight", "1,nan,1"], "--widths-weight: give three non-negative numbers"),
                          (["--model", tmp_path / "none"], "no such directory")]:
        proc = run("qsjax.weights", "calibrate-amq", *(["--model", store_dir] if "--model" not in args else []), *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")


def test_the_commands_defaults_are_the_settings_defaults():
    from qsjax.weights import parse_args

    args = parse_args(["calibrate-amq"])
    s = Settings()
    assert (args.group_size, args.steps, args.block_steps, args.widths_weight) == (
        s.group_size, s.steps, s.block_steps, s.widths_weight)


def test_a_quantized_model_keeps_its_float_dtype(tiny_models):
    """The generator's K/V and the scorer's accounting read `Model.dtype`: AMQ's int8 codes must not change it."""
    from qsjax.quicksilver.decoding.steps import prepare
    from qsjax.quicksilver.settings import QuickSilverConfig

    for name in ("gpt2", "llama-gqa"):
        model, _ = tiny_models[name]
        assert prepare(model, QuickSilverConfig(amq_layer=1)).dtype == model.dtype == jnp.float32, name


def test_the_calibrated_store_has_sharding_rules():
    """Its per-width steps and offsets [3, G, D_out] shard like the naive scales: along the output."""
    from qsjax.runtime.sharding import logical_axes

    for part in ("scale", "zero"):
        assert logical_axes(("blocks", 1, "down_proj", part), 3) == (None, None, "embed")
        assert logical_axes(("blocks", 1, "gate_up_proj", part), 3) == (None, None, "gate_up")
