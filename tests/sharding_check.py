"""Sharded against single-device runs, in a process started with 8 CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8) by tests/test_sharding.py: a process that
has already initialised JAX cannot get more devices.

    python tests/sharding_check.py PLAN_JSON

PLAN_JSON: {"models": {name: directory}, "checks": [[model name, data, model, check], ...],
"eval_model": directory with a tokenizer and data.txt}. Prints one JSON object on stdout, for each
check "name data model check" -> {"diff": max |sharded - single device| over the float outputs,
"same": whether the discrete outputs (greedy tokens, decisions) are equal, "sharded": whether the
sharded run's result (generate: the model's parameters) lives on several devices, "rows": the mesh axis its batch rows are split over, where
the result is a device array}; "specs": where each parameter of a quantized, sharded
model went; "eval": the command line's results with and without --mesh.
"""

import contextlib
import io
import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsjax import eval as eval_cli
from qsjax.runtime.cli import UsageError
from qsjax.runtime.generator import Generator
from qsjax.checkpoints.hf_params import load_model
from qsjax.evaluation.perplexity import Scorer, token_nll
from qsjax.quicksilver.settings import QuickSilverConfig
from qsjax.quicksilver.scorer import QuickSilverScorer
from qsjax.quicksilver.decoding.steps import prepare
from qsjax.quicksilver.window.scoring import quicksilver_nll
from qsjax.runtime.sharding import make_mesh, shard_batch, shard_model

# QuickSilver runs its masked reference execution here (same decisions and logits as the compacted
# one, which tests/test_quicksilver_forward.py checks): the compacted program takes ~5x longer to
# compile, too long for this file's time budget.
QS = {
    "qs-cutoff": QuickSilverConfig(halt="cutoff", halt_cutoff_layer=1, kv_skip="mask", compact=False),
    "qs-amq": QuickSilverConfig(halt="cutoff", halt_cutoff_layer=1, kv_skip="mask", amq_layer=2, compact=False),
}
_reference = {}  # single-device results shared by checks on several meshes


def max_diff(a, b) -> float:
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(a) == len(b) > 0
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()) for x, y in zip(a, b))


def spread(x) -> bool:
    return len(x.sharding.device_set) > 1


def rows_axis(x, dim: int = 0):
    """The mesh axis that splits x's batch dimension (None: whole on every device)."""
    spec = tuple(x.sharding.spec) + (None,) * x.ndim
    return spec[dim] if isinstance(spec[dim], str) or spec[dim] is None else ",".join(spec[dim])


def batch(rows: int):
    """Random tokens [rows, 16] and per-row left-padding starts."""
    tokens = np.random.default_rng(rows).integers(2, 96, (rows, 16)).astype(np.int32)
    return tokens, (np.arange(rows) * 3 % 7).astype(np.int32)


def check_logits(name, base, sharded, mesh):
    """Full-window logits of 8 left-padded rows, given as NumPy (copied whole to every device) and
    placed over "data" beforehand."""
    tokens, start = batch(8)
    if name not in _reference:
        _reference[name] = base.logits(tokens, start)
    out = sharded.logits(tokens, start)
    placed = sharded.logits(shard_batch(jnp.asarray(tokens), mesh), start)
    greedy = lambda z: np.asarray(jnp.argmax(z, -1))
    same = np.array_equal(greedy(_reference[name]), greedy(out)) and np.array_equal(greedy(out), greedy(placed))
    return {"diff": max_diff((_reference[name],) * 2, (out, placed)), "same": same, "sharded": spread(out),
            "rows": rows_axis(out)}


def check_scorer(name, base, sharded, mesh):
    tokens, _ = batch(4)
    out = Scorer(sharded)(tokens, 5)
    # the function the scorer compiles, on the placed inputs, to see where its result lives
    nll = jax.jit(lambda s, t: token_nll(sharded.module(s), t, None, 5)[0])(sharded.state, sharded.place(tokens))
    ref = Scorer(base)(tokens, 5)
    return {"diff": max_diff((ref, ref), (out, nll)), "same": bool(np.isfinite(out).all()), "sharded": spread(nll),
            "rows": rows_axis(nll)}


def check_decode(name, base, sharded, mesh):
    """Prefill a left-padded batch, then three decode steps fed the same tokens."""
    tokens, start = batch(4)
    (z0, c0), (z1, c1) = base.prefill(tokens, start, 32), sharded.prefill(tokens, start, 32)
    diffs, same = [max_diff(z0, z1)], True
    for _ in range(3):
        nxt = np.asarray(jnp.argmax(z0, -1), np.int32)
        same &= np.array_equal(nxt, np.asarray(jnp.argmax(z1, -1)))  # the same greedy tokens
        (z0, c0), (z1, c1) = base.decode_step(c0, nxt), sharded.decode_step(c1, nxt)
        diffs.append(max_diff(z0, z1))
    return {"diff": max(diffs), "same": bool(same), "sharded": spread(c1.k[0]), "rows": rows_axis(c1.k[0], 0),
            "kv_heads": rows_axis(c1.k[0], 1)}


def check_quicksilver(name, base, sharded, mesh, qs):
    """QuickSilver perplexity scoring; the model quantized (AMQ) before sharding, as the CLIs do."""
    sharded = shard_model(prepare(base, qs), mesh)
    tokens, _ = batch(4)
    lengths = np.array([16, 11, 16, 16], np.int32)
    nll0, out0 = QuickSilverScorer(base, qs).score(tokens, lengths, 8)
    nll1, out1 = QuickSilverScorer(sharded, qs).score(tokens, lengths, 8)
    discrete = lambda o: [o.halt, o.fused, o.bits, o.eligible, *jax.tree.leaves(o.stats)]
    same = all(np.array_equal(a, b) for a, b in zip(discrete(out0), discrete(out1)))
    halted = bool((np.asarray(out0.halt) < base.cfg.n_layers).any())  # the mechanism did act
    # the scorer reads its results back to NumPy: run its function on the placed inputs to see where they live
    halt = jax.jit(lambda s, t, n: quicksilver_nll(qs, sharded.module(s), t, n, 8).halt)(
        sharded.state, sharded.place(tokens), sharded.place(lengths))
    return {"diff": max_diff(nll0, nll1), "same": same and halted, "sharded": spread(halt), "rows": rows_axis(halt)}


def check_generate(name, base, sharded, mesh):
    """Greedy generation of two prompts (split over "data"), and one streamed prompt (which does
    not divide over "data", so every data group runs it)."""
    tokenizer = types.SimpleNamespace(eos_ids=(), pad_id=0, decode=lambda ids: "")
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    single = Generator(base, tokenizer)(prompts, max_new_tokens=5).token_ids
    sharded_gen = Generator(base, tokenizer, None, mesh)
    streamed = []
    sharded_gen(prompts[:1], max_new_tokens=5, stream=streamed.append)
    same = sharded_gen(prompts, max_new_tokens=5).token_ids == single and streamed == single[0]
    placed = all(spread(x) for x in jax.tree.leaves(sharded_gen.model.state))
    return {"diff": 0.0, "same": bool(same), "sharded": placed and sharded_gen.model.mesh is mesh}


CHECKS = {"logits": check_logits, "scorer": check_scorer, "decode": check_decode, "generate": check_generate,
          **{key: (lambda *a, qs=qs: check_quicksilver(*a, qs)) for key, qs in QS.items()}}


def run_eval(model_dir: Path, *flags) -> dict:
    """`python -m qsjax.eval` in this process; -> its JSON report, or the UsageError's message."""
    argv = ["--model", str(model_dir), "--data", str(model_dir / "data.txt"), "--max-length", "32", "--stride",
            "16", "--max-eval-tokens", "64", "--batch-size", "2", "--json", "-", "--no-progress", *flags]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            eval_cli.main(argv)
    except UsageError as e:
        return {"error": str(e)}
    return json.loads(out.getvalue())


def main(plan):
    assert jax.device_count() == 8, jax.devices()
    models = {name: load_model(path) for name, path in plan["models"].items()}
    report = {}
    for name, data, model, check in plan["checks"]:
        mesh = make_mesh(data, model)
        base = models[name]
        report[f"{name} {data} {model} {check}"] = CHECKS[check](name, base, shard_model(base, mesh), mesh)
    sharded = shard_model(prepare(models["llama-gqa"], QS["qs-amq"]), make_mesh(2, 4))
    report["specs"] = {".".join(map(str, k)): str(v.get_value().sharding.spec) for k, v in nnx.to_flat_state(sharded.state)}
    eval_dir = Path(plan["eval_model"])
    report["eval"] = {
        "single": run_eval(eval_dir),
        "mesh": run_eval(eval_dir, "--mesh", "data=2,model=4"),
        "odd batch": run_eval(eval_dir, "--mesh", "data=2,model=4", "--batch-size", "3"),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
