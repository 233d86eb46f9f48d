"""Block-wise refinement of the nested grids: its objective falls, it is deterministic, and the inputs it
hands each block are the quantized model's own."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from qsjax.quicksilver import amqstore, blockfit
from qsjax.quicksilver.calibration import Settings, clip_of, initial, raw_of
from qsjax.quicksilver.mechanisms import nested
from qsjax.quicksilver.mechanisms.matryoshka import WIDTHS

PER_LINEAR = Settings(group_size=32, steps=5, rank=8, block_steps=0)
REFINED = dataclasses.replace(PER_LINEAR, block_steps=20, block_learning_rate=0.02)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from conftest import save_tiny_llama_with_tokenizer

    from qsjax.checkpoints.hf_params import load_model

    return load_model(save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("blockfit"), ["One two three."]))


def tokens():
    return np.random.default_rng(1).integers(0, 96, (2, 24)).astype(np.int32)


def test_raw_of_inverts_clip_of(rng):
    raw = {k: jnp.asarray(rng.normal(0, 1, (3, 5)), jnp.float32) for k in initial((3, 5), 0.0)}
    again = raw_of(clip_of(raw))
    for k in raw:
        np.testing.assert_allclose(again[k], raw[k], atol=2e-5)


def test_refinement_lowers_each_blocks_objective_and_is_deterministic(model):
    per_linear = amqstore.build(model, tokens(), PER_LINEAR, progress=False)
    a, b = (amqstore.build(model, tokens(), REFINED, progress=False) for _ in range(2))
    assert a.to_bytes() == b.to_bytes()
    assert per_linear.meta["block_output_error"] is None
    assert a.clips.keys() == per_linear.clips.keys()
    for layer, err in a.meta["block_output_error"].items():
        start = sum(s / m for s, m in zip(err["per_linear"], err["minmax"]))
        after = sum(s / m for s, m in zip(err["block"], err["minmax"]))
        assert after < start, (layer, err)
    for clip in a.clips.values():
        assert ((0 < clip["gamma"]) & (clip["gamma"] <= 1)).all() and (clip["step2"] > 0).all()
    # the per-linear stage is the same computation either way: refinement changes the grids it starts from
    assert any(not np.array_equal(a.clips[k]["gamma"], per_linear.clips[k]["gamma"]) for k in a.clips)


def test_each_block_sees_the_quantized_models_own_inputs(model):
    """The error reported for block 2 at width r is that of the model whose blocks 1..2 all run their
    r-bit views (the stored grids, dequantized from int8 codes), against the dense model."""
    from qsjax.dense import blocks, layers
    from qsjax.dense.model import Layout, block

    store = amqstore.build(model, tokens(), REFINED, progress=False)
    module = model.module()
    t = tokens()
    layout = Layout.left_padded(module.cfg, jnp.zeros(t.shape[0], jnp.int32), t.shape[1])
    x0 = blocks.embed(module, jnp.asarray(t), layout.positions)
    dense = x0
    for blk in module.blocks[:2]:
        dense, _ = block(blk, dense, layout)
    for i, r in enumerate(WIDTHS):
        x = x0
        for layer, blk in enumerate(module.blocks[:2]):
            names = {id(v): k for k, v in vars(blk).items()}

            def linear(m, h, layer=layer, names=names, r=r):
                q = store.quantizer(layer, names[id(m)])(m.w[...])
                w = nested.dequantize_nested(q.codes, q.scale, q.zero, r, q.group)
                return layers.linear(h, w, None if m.b is None else m.b[...])

            x, _ = block(blk, x, layout, linear)
        got = store.meta["block_output_error"]["1"]["block"][i]
        np.testing.assert_allclose(float(jnp.mean((x - dense) ** 2)), got, rtol=2e-3)


def test_long_rows_are_cut_where_attention_has_a_gradient():
    from qsjax.dense.attention import DIRECT_MAX

    t = np.arange(2 * 2048).reshape(2, 2048)
    rows = blockfit.differentiable_rows(t)
    assert rows.shape[1] ** 2 <= DIRECT_MAX < (2 * rows.shape[1]) ** 2
    np.testing.assert_array_equal(rows.reshape(2, 2048), t)  # the same tokens, in order
