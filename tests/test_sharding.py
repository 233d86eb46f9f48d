"""Sharding over a ("data", "model") mesh: the --mesh parser and the placement rules in this
process (no devices needed), and sharded against single-device results in a child process with 8
CPU devices (tests/sharding_check.py): this process already initialised JAX with one device."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_hf_model, save_tiny_gpt2_with_tokenizer
from jax.sharding import PartitionSpec as P

from qsjax import eval as eval_cli
from qsjax import generate as generate_cli
from qsjax.runtime.cli import run_cli
from qsjax.dense.config import ModelConfig
from qsjax.runtime.sharding import MeshError, logical_axes, parse_mesh, partition_spec

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5
# families with the most parameters beyond Llama's, 8 query and 4 key/value heads so that both split
# over model=4: Gemma 2 (post-norms, soft-capping, GeGLU, sliding and global layers, three layers
# with a window shorter than the 16-token batch) and Qwen3 (q/k norms)
SPLIT_HEADS = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=8, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
FAMILIES = {
    "gemma2": ("Gemma2Config", dict(SPLIT_HEADS, query_pre_attn_scalar=24, sliding_window=5, pad_token_id=0,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "qwen3": ("Qwen3Config", dict(SPLIT_HEADS, tie_word_embeddings=True)),
}
KV_HEADS = {"llama-gqa": 2, "gemma2": 4, "qwen3": 4}
# (model, data, model, check): every check on the 2 x 4 mesh (the tiny Llama's 2 key/value heads do
# not divide over 4: replicated); on 2 x 2 (4 of the 8 devices) its key/value heads and KV cache
# split too; data only; model only (4 query heads do not divide over 8: replicated, the MLP splits);
# Gemma 2 and Qwen3 on 2 x 4, their attention and KV cache split
CHECKS = [
    *[("llama-gqa", 2, 4, c) for c in ("logits", "scorer", "decode", "generate", "qs-cutoff", "qs-amq")],
    *[("gpt2", 2, 4, c) for c in ("logits", "scorer", "decode")],
    ("llama-gqa", 2, 2, "logits"),
    ("llama-gqa", 2, 2, "decode"),
    ("llama-gqa", 8, 1, "logits"),
    ("llama-gqa", 1, 8, "logits"),
    *[(name, 2, 4, c) for name in FAMILIES for c in ("logits", "decode")],
    ("gemma2", 2, 4, "generate"),
]
TEXT = "\n\n".join(
    ["The quick brown fox jumps over the lazy dog.", "A small model reads a small text, one token at a time.",
     "Perplexity is the exponential of the mean negative log-likelihood."] * 4
)

# SmolLM2-135M's shapes: 9 query heads, 3 key/value heads, MLP 1,536
SMOLLM2 = ModelConfig(arch="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                      d_ff=1536, max_positions=8192, norm_eps=1e-5, tie_embeddings=True, attn_bias=False, mlp_bias=False)
GPT2 = ModelConfig(arch="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64,
                   d_ff=3072, max_positions=1024, norm_eps=1e-5, tie_embeddings=True, attn_bias=True, mlp_bias=True)


@pytest.mark.parametrize("spec, devices, expected", [
    ("data=2,model=4", 8, (2, 4)),
    ("model=4", 8, (1, 4)),
    (" data = 8 ", 8, (8, 1)),
    ("model=2,data=2", 8, (2, 2)),  # fewer devices than there are: the first four
])
def test_parse_mesh(spec, devices, expected):
    assert parse_mesh(spec, devices) == expected


@pytest.mark.parametrize("spec, devices, processes, message", [
    ("", 8, 1, "expected AXIS=SIZE items separated by commas, e.g. --mesh data=2,model=4"),
    ("data:2", 8, 1, "expected AXIS=SIZE"),
    ("data=2,", 8, 1, "expected AXIS=SIZE"),
    ("batch=2", 8, 1, "unknown axis 'batch' (the axes are data and model)"),
    ("data=2,data=2", 8, 1, "axis data is given twice"),
    ("model=0", 8, 1, "the size of model must be a positive integer, got '0'"),
    ("model=two", 8, 1, "got 'two'"),
    ("data=2,model=4", 1, 1, ("needs data * model = 8 devices but 1 is available; on CPU, start the process "
                              "with XLA_FLAGS=--xla_force_host_platform_device_count=8")),
    ("data=2", 16, 2, "uses 2 of the 16 devices of 2 processes; with several processes the mesh must span every device"),
])
def test_parse_mesh_errors(spec, devices, processes, message):
    with pytest.raises(MeshError) as e:
        parse_mesh(spec, devices, processes)
    assert message in str(e.value) and "\n" not in str(e.value)


@functools.cache
def parameter_shapes(cfg: ModelConfig) -> dict:
    """Parameter path -> shape, without allocating the weights."""
    from flax import nnx

    from qsjax.dense.modules import Transformer

    return {k: v.shape for k, v in nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: Transformer(cfg))))}


@pytest.mark.parametrize("cfg, path, mesh, expected", [
    # SmolLM2 on model=4: 9 and 3 heads do not divide, so attention stays whole; the MLP splits
    (SMOLLM2, ("blocks", 0, "qkv_proj", "w"), {"data": 2, "model": 4}, P(None, None)),
    (SMOLLM2, ("blocks", 0, "o_proj", "w"), {"data": 2, "model": 4}, P(None, None)),
    (SMOLLM2, ("blocks", 0, "gate_up_proj", "w"), {"data": 2, "model": 4}, P(None, "model")),
    (SMOLLM2, ("blocks", 0, "down_proj", "w"), {"data": 2, "model": 4}, P("model", None)),
    # on model=3 every head group divides: the fused q/k/v in whole key/value groups
    (SMOLLM2, ("blocks", 0, "qkv_proj", "w"), {"data": 1, "model": 3}, P(None, "model")),
    (SMOLLM2, ("blocks", 0, "o_proj", "w"), {"data": 1, "model": 3}, P("model", None)),
    # gate/up splits in whole (gate, up) pairs: 2F = 3,068 columns divide by 4, F = 1,534 pairs do not
    (dataclasses.replace(SMOLLM2, d_ff=1534), ("blocks", 0, "gate_up_proj", "w"), {"data": 1, "model": 4}, P(None, None)),
    # int8 codes shard like the weight, per-channel scales like its output, biases like its output
    (SMOLLM2, ("blocks", 5, "gate_up_proj", "codes"), {"data": 2, "model": 4}, P(None, "model")),
    (SMOLLM2, ("blocks", 5, "gate_up_proj", "scale"), {"data": 2, "model": 4}, P(None, "model")),
    (SMOLLM2, ("blocks", 5, "down_proj", "scale"), {"data": 2, "model": 4}, P(None, None)),
    (SMOLLM2, ("blocks", 0, "attn_norm", "scale"), {"data": 2, "model": 4}, P(None)),
    (SMOLLM2, ("tok_embed",), {"data": 2, "model": 4}, P(None, None)),
    # GPT-2: the fused qkv splits in whole heads (36 of them), its bias with it
    (GPT2, ("blocks", 0, "qkv_proj", "w"), {"data": 1, "model": 4}, P(None, "model")),
    (GPT2, ("blocks", 0, "qkv_proj", "b"), {"data": 1, "model": 4}, P("model")),
    (GPT2, ("blocks", 0, "qkv_proj", "w"), {"data": 1, "model": 8}, P(None, None)),
    (GPT2, ("blocks", 0, "fc", "w"), {"data": 1, "model": 8}, P(None, "model")),
    (GPT2, ("blocks", 0, "out_proj", "b"), {"data": 1, "model": 8}, P(None)),
    (GPT2, ("pos_embed",), {"data": 1, "model": 8}, P(None, None)),
])
def test_partition_spec(cfg, path, mesh, expected):
    shapes = parameter_shapes(cfg)
    shape = shapes.get(path) or shapes[path[:-1] + ("w",)]  # codes/scale: shaped from the float weight
    if path[-1] == "scale" and path[-2].endswith("proj"):
        shape = (1, shape[-1])
    assert partition_spec(logical_axes(path, len(shape)), shape, cfg, mesh) == expected


def test_unknown_parameter_has_no_rule():
    with pytest.raises(KeyError, match="no sharding rule for parameter blocks.0.router.w"):
        logical_axes(("blocks", 0, "router", "w"), 2)


@pytest.mark.parametrize("cli, argv", [
    (eval_cli, ["--mesh", "data=64,model=64", "--batch-size", "64"]),
    (generate_cli, ["--mesh", "model=4096", "hello"]),
    (generate_cli, ["--mesh", "model=2,pipeline=2", "hello"]),
])
def test_cli_mesh_errors(cli, argv, capsys):
    """Fails before any model or data is read: one line, status 2."""
    with pytest.raises(SystemExit) as e:
        run_cli(cli.main, ["--model", "no/such/model", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --mesh") and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def child_report(tiny_dirs, tmp_path_factory):
    """Run every check in one child process with 8 CPU devices; -> its JSON report."""
    eval_dir = save_tiny_gpt2_with_tokenizer(tmp_path_factory.mktemp("eval-gpt2"), TEXT.split("\n\n"), vocab_size=320)
    (eval_dir / "data.txt").write_text(TEXT, encoding="utf-8")
    models = {name: str(tiny_dirs[name][0]) for name in ("llama-gqa", "gpt2")}
    for name, (kind, fields) in FAMILIES.items():
        models[name] = str(tmp_path_factory.mktemp(name))
        random_hf_model(kind, fields).save_pretrained(models[name], safe_serialization=True)
    plan = {"models": models,
            "checks": CHECKS, "eval_model": str(eval_dir)}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "QSJAX_COMPILATION_CACHE": "off"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_check.py"), json.dumps(plan)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name, data, model, check", CHECKS, ids=[" ".join(map(str, c)) for c in CHECKS])
def test_sharded_equals_single_device(child_report, name, data, model, check):
    result = child_report[f"{name} {data} {model} {check}"]
    assert result["diff"] <= TOL, result
    assert result["same"], result  # decisions / greedy tokens identical (QuickSilver: and it did halt tokens)
    assert result["sharded"], result
    if data > 1 and "rows" in result:  # 4 or 8 rows divide over "data": the batch is split
        assert result["rows"] == "data", result
    if check == "decode" and name in KV_HEADS:  # the cache follows the key/value heads where they split
        assert result["kv_heads"] == ("model" if KV_HEADS[name] % model == 0 else None), result


def test_placement_of_quantized_llama(child_report):
    """Tiny Llama (4 query heads, 2 key/value heads, AMQ from layer 2) on data=2, model=4: the MLP
    and the output projection's 4 heads split, the fused q/k/v (2 key/value groups over 4)
    replicated, int8 codes and scales placed too."""
    specs = child_report["specs"]
    assert specs["blocks.0.qkv_proj.w"] == str(P(None, None))
    assert specs["blocks.0.o_proj.w"] == str(P("model", None))
    assert specs["blocks.1.gate_up_proj.codes"] == str(P(None, "model"))
    assert specs["blocks.1.gate_up_proj.scale"] == str(P(None, "model"))
    assert specs["blocks.1.down_proj.codes"] == str(P("model", None))
    assert "blocks.1.gate_up_proj.w" not in specs  # the float weights were dropped


def test_eval_cli_mesh(child_report):
    """`qsjax.eval --mesh data=2,model=4 --batch-size 2` gives the single-device perplexity: three
    windows run as a first window alone (one row does not divide over "data" and runs whole), then
    two side by side, split over "data". A batch size that does not divide is refused."""
    single, mesh = child_report["eval"]["single"], child_report["eval"]["mesh"]
    assert mesh["mesh"] == {"data": 2, "model": 4} and "mesh" not in single
    assert mesh["windows"] == single["windows"] == 3 and mesh["tokens_scored"] == single["tokens_scored"] == 63
    assert abs(mesh["nll_mean"] - single["nll_mean"]) <= TOL
    assert child_report["eval"]["odd batch"]["error"].startswith(
        "--batch-size 3 is not a multiple of the mesh's data axis (2); use --batch-size 2")
