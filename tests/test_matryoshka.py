"""Adaptive Matryoshka Quantization: int8 storage, nested views, bounded errors, per-token widths."""

import jax.numpy as jnp
import numpy as np
import pytest

from qsjax.quicksilver.mechanisms.matryoshka import (
    MatryoshkaLinear, choose_bits, dequantize, matryoshka_linear, quantize, quantize_blocks, view_codes, view_errors,
)


@pytest.fixture
def weight(rng):
    return jnp.asarray(rng.normal(0, 0.05, (64, 48)).astype(np.float32))


def test_int8_storage_is_four_times_smaller(weight):
    q = quantize(weight)
    assert q.codes.dtype == jnp.int8
    assert q.codes.nbytes * 4 == weight.nbytes
    assert q.nbytes == weight.nbytes // 4 + 4 * weight.shape[1]  # plus one float32 scale per output channel


def test_int8_error_is_within_half_a_step(weight):
    q = quantize(weight)
    err = jnp.abs(dequantize(q, 8) - weight)
    assert bool((err <= q.scale / 2 + 1e-7).all())


def test_views_keep_the_most_significant_bits():
    codes = jnp.arange(-127, 128, dtype=jnp.int8)
    four, two = np.asarray(view_codes(codes, 4)), np.asarray(view_codes(codes, 2))
    assert set(np.unique(four // 16)) <= set(range(-8, 8)) and (four % 16 == 0).all()
    assert set(np.unique(two // 64)) <= {-2, -1, 0, 1} and (two % 64 == 0).all()
    assert np.abs(four - np.asarray(codes)).max() <= 16  # round to nearest, clamped at 7 * 16 = 112
    assert view_codes(codes, 8).tolist() == codes.astype(jnp.int32).tolist()


def test_view_errors_are_ordered_and_bounded(weight):
    e = view_errors(weight)
    assert e[8] < 0.01 < e[4] < e[2] <= 1.0
    assert e[4] < 0.25


def test_bits_from_entropy():
    h = jnp.array([0.1, 1.0, 2.0, 3.0, 3.5])
    assert choose_bits(h, 1.0, 3.0).tolist() == [2, 4, 4, 4, 8]


def test_each_token_uses_its_own_view(weight, rng):
    x = jnp.asarray(rng.normal(0, 1, (3, 64)).astype(np.float32))
    bits = jnp.array([8, 4, 2])
    y = matryoshka_linear(x, quantize(weight), bits)
    for i, r in enumerate((8, 4, 2)):
        np.testing.assert_allclose(y[i], x[i] @ dequantize(quantize(weight), r), rtol=1e-5, atol=1e-6)


def test_quantize_blocks_replaces_linears_above_the_layer(tiny_models, rng):
    model, _ = tiny_models["llama-gqa"]
    module = model.module()
    stored = quantize_blocks(module, 1)
    assert isinstance(module.blocks[1].qkv_proj, MatryoshkaLinear)
    assert not isinstance(module.blocks[0].qkv_proj, MatryoshkaLinear)
    float_bytes = sum(getattr(model.module().blocks[1], n).w[...].nbytes for n in
                      ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    assert float_bytes / 4 <= stored < float_bytes / 3.5


def test_fused_maps_quantize_as_their_checkpoint_matrices(tiny_dirs, tiny_models, rng):
    """Scales are per output column, so the fused q/k/v and gate/up quantize exactly as Hugging Face's
    separate matrices would one by one (each column keeps its own scale), and give the same outputs
    at every width."""
    from safetensors.numpy import load_file

    from qsjax.dense.layers import fuse_gate_up, fuse_qkv

    path, _ = tiny_dirs["llama-gqa"]
    hf = lambda name: jnp.asarray(load_file(path / "model.safetensors")[f"model.layers.1.{name}.weight"].T)
    module = tiny_models["llama-gqa"][0].module()
    quantize_blocks(module, 1)
    blk = module.blocks[1]
    parts = {"qkv_proj": ([quantize(hf(f"self_attn.{p}_proj")) for p in "qkv"], lambda *a: fuse_qkv(*a, 2)),
             "gate_up_proj": ([quantize(hf(f"mlp.{p}_proj")) for p in ("gate", "up")], fuse_gate_up)}
    x = jnp.asarray(rng.normal(0, 1, (2, 3, 32)).astype(np.float32))
    bits = jnp.array([[8, 4, 2], [2, 8, 4]])
    for name, (qs, fuse) in parts.items():
        fused = getattr(blk, name)
        np.testing.assert_array_equal(fused.codes[...], fuse(*(q.codes for q in qs)))
        np.testing.assert_array_equal(fused.scale[...], fuse(*(q.scale for q in qs)))
        separate = fuse(*(matryoshka_linear(x, q, bits) for q in qs))
        np.testing.assert_allclose(fused(x, bits), separate, rtol=1e-5, atol=1e-5)
