"""The analytic FLOP counts against XLA's own count of the compiled forward.

XLA's cost analysis counts every op, elementwise ones included (norms, GELU/SiLU, RoPE, softmax),
which `qsjax.evaluation.flops` leaves out; at d_model = 256 and T = 256 the matmuls are ~99% of the work, so
the two agree within 5%. XLA counts the body of a `lax.scan` (a while loop) once, whatever the trip
count, so the dense forward is unrolled here (one `block` call per layer), and the scanned scoring
function is checked with a single layer.
"""

import jax
import jax.numpy as jnp
import pytest

from qsjax.dense.config import ModelConfig
from qsjax.evaluation.flops import Flops, dense_forward_flops, forward_flops
from qsjax.dense.blocks import embed, lm_logits
from qsjax.dense.model import Layout, Model, block
from qsjax.dense.modules import Transformer
from qsjax.evaluation.perplexity import token_nll

T = 256
CONFIGS = {
    "gpt2": dict(arch="gpt2", n_heads=4, n_kv_heads=4, d_ff=1024, attn_bias=True, mlp_bias=True),
    "llama": dict(arch="llama", n_heads=4, n_kv_heads=2, d_ff=512, attn_bias=False, mlp_bias=False),
}


def make_config(name: str, n_layers: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=512, d_model=256, n_layers=n_layers, head_dim=64, max_positions=T, norm_eps=1e-5,
        tie_embeddings=True, **CONFIGS[name],
    )  # fmt: skip


def unrolled_logits(model: Transformer, tokens):
    """The dense forward with the layers unrolled.  tokens [B, T] -> logits [B, T, V]"""
    B, T = tokens.shape
    w = Layout.left_padded(model.cfg, jnp.zeros(B, jnp.int32), T)
    x = embed(model, tokens, w.positions)
    for blk in model.blocks:
        x, _ = block(blk, x, w)
    return lm_logits(model, x)


def xla_flops(f, model: Model, *args) -> float:
    spec = jax.ShapeDtypeStruct((1, T), jnp.int32)
    return (
        jax.jit(f, static_argnums=tuple(range(2, 2 + len(args))))
        .lower(model.state, spec, *args)
        .compile()
        .cost_analysis()["flops"]
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_dense_forward_matches_xla(name):
    cfg = make_config(name, n_layers=2)
    model = Model.from_module(Transformer(cfg))
    counted = xla_flops(lambda s, t: unrolled_logits(model.module(s), t), model)
    ours = dense_forward_flops(cfg, batch=1, length=T, lm_head_positions=T)
    assert ours.total == pytest.approx(counted, rel=0.05)
    assert ours.total <= counted  # elementwise work is left out, never matmul work added


@pytest.mark.parametrize("name", CONFIGS)
def test_scoring_forward_matches_xla(name):
    """The LM head runs only on the positions the scoring function keeps."""
    cfg = make_config(name, n_layers=1)
    model = Model.from_module(Transformer(cfg))
    offset = T // 2 - 1
    counted = xla_flops(lambda s, t, o: token_nll(model.module(s), t, None, o)[0], model, offset)
    ours = dense_forward_flops(cfg, batch=1, length=T, lm_head_positions=T - 1 - offset)
    assert ours.total == pytest.approx(counted, rel=0.05)


def test_counts_by_hand():
    cfg = make_config("llama", n_layers=2)  # D 256, H 4, K 2, Dh 64, F 512, V 512
    f = dense_forward_flops(cfg, batch=3, length=10, lm_head_positions=7)
    tokens = 3 * 10
    assert f.projections == 2 * tokens * (256 * (4 + 2 * 2) * 64 + 4 * 64 * 256) * 2
    assert f.mlp == 2 * tokens * 3 * 256 * 512 * 2
    assert f.attention == 4 * (tokens * 10) * 4 * 64 * 2  # the full 10 x 10 square per row
    assert f.lm_head == 2 * 7 * 256 * 512
    assert f.total == f.attention + f.projections + f.mlp + f.lm_head
    gpt2 = make_config("gpt2", n_layers=1)
    assert dense_forward_flops(gpt2, 1, 1, 0).mlp == 2 * 2 * 256 * 1024


def test_per_layer_counts_and_sum():
    cfg = make_config("gpt2", n_layers=2)
    dense = dense_forward_flops(cfg, batch=1, length=8, lm_head_positions=8)
    assert forward_flops(cfg, [8, 8], [64, 64], 8) == dense
    halved = forward_flops(cfg, [8, 4], [64, 32], 8)  # layer 2 runs half the tokens
    assert halved.mlp == dense.mlp * 3 // 4 and halved.attention == dense.attention * 3 // 4
    assert (dense + halved).total == dense.total + halved.total
    report = dense.to_json(tokens_scored=7)
    assert set(report) == {"total", "per_token", "attention", "projections", "mlp", "lm_head"}
    assert report["per_token"] == pytest.approx(dense.total / 7)
    assert Flops() + dense == dense
