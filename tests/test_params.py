"""The strict weight-key map: every loader error names the key and the shapes."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qsjax.checkpoints.hf_params import WeightError, load_model


@pytest.fixture
def model_copy(tiny_dirs, tmp_path):
    """A writable copy of a tiny model directory, and its tensors."""
    def copy(name):
        src, _ = tiny_dirs[name]
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst, load_file(dst / "model.safetensors")
    return copy


def test_missing_key(model_copy):
    path, tensors = model_copy("llama-gqa")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    # named as in the checkpoint, with the checkpoint's [out, in] shape
    with pytest.raises(WeightError, match=r"no tensor model\.layers\.1\.mlp\.up_proj\.weight \(shape \(64, 32\)\)"):
        load_model(path)


def test_unexpected_key(model_copy):
    path, tensors = model_copy("gpt2")
    tensors["transformer.h.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(WeightError, match=r"unexpected key 'transformer\.h\.0\.attn\.extra\.weight' \(2, 2\)"):
        load_model(path)


def test_key_for_a_layer_the_config_lacks(model_copy):
    path, tensors = model_copy("gpt2")
    tensors["transformer.h.5.ln_1.weight"] = np.zeros(32, np.float32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(WeightError, match=r"h\.5\.ln_1\.weight.*no parameter blocks\.5\.ln1\.scale"):
        load_model(path)


def test_wrong_shape(model_copy):
    path, tensors = model_copy("llama-mqa")
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 32), np.float32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(WeightError, match=r"k_proj\.weight' has shape \(16, 32\), expected \(8, 32\)"):
        load_model(path)


def test_duplicate_key_across_shards(model_copy):
    path, tensors = model_copy("gpt2")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names}, path / "part-1.safetensors")
    save_file({names[0]: tensors[names[0]]}, path / "part-2.safetensors")
    weight_map = {k: "part-1.safetensors" for k in names}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {**weight_map, "x": "part-2.safetensors"}}))
    with pytest.raises(WeightError, match=rf"duplicate key '{names[0]}'"):
        load_model(path)


def test_sharded_checkpoint_loads(model_copy, tiny_dirs, rng):
    path, tensors = model_copy("llama-mha")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, path / "a.safetensors")
    save_file({k: tensors[k] for k in names[half:]}, path / "b.safetensors")
    weight_map = {k: ("a" if i < half else "b") + ".safetensors" for i, k in enumerate(names)}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tokens = rng.integers(0, 96, (1, 8))
    np.testing.assert_array_equal(load_model(path).logits(tokens), load_model(tiny_dirs["llama-mha"][0]).logits(tokens))


def test_truncated_file(model_copy):
    path, _ = model_copy("gpt2")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightError, match=r"cannot read .*model\.safetensors.*truncated or corrupted"):
        load_model(path)


def test_no_weights_file(model_copy):
    path, _ = model_copy("gpt2")
    (path / "model.safetensors").unlink()
    with pytest.raises(WeightError, match="has no model.safetensors"):
        load_model(path)


def test_tied_head_saved_anyway_is_accepted(model_copy, rng):
    path, tensors = model_copy("llama-gqa")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, path / "model.safetensors")
    load_model(path)


def test_untied_head_missing(model_copy):
    path, tensors = model_copy("llama-mha")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(WeightError, match=r"no tensor lm_head\.weight \(shape \(96, 32\)\)"):
        load_model(path)


def test_unsupported_dtype(tiny_dirs):
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        load_model(tiny_dirs["gpt2"][0], "int8")


def test_fused_qkv_missing_part(model_copy):
    """Q, K and V fill one fused parameter: each is still required, and named as in the checkpoint."""
    path, tensors = model_copy("llama-gqa")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(WeightError, match=r"no tensor model\.layers\.0\.self_attn\.k_proj\.weight \(shape \(16, 32\)\); 1 missing"):
        load_model(path)


def test_fused_part_with_the_wrong_shape(model_copy):
    """A part shaped like another part (V given Q's shape) is refused, not fused."""
    path, tensors = model_copy("llama-gqa")
    tensors["model.layers.1.self_attn.v_proj.weight"] = tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(WeightError, match=r"v_proj\.weight' has shape \(32, 32\), expected \(16, 32\)"):
        load_model(path)


def test_fused_part_given_twice(model_copy):
    path, tensors = model_copy("llama-bias")
    tensors["layers.0.mlp.gate_proj.bias"] = tensors["model.layers.0.mlp.gate_proj.bias"]  # the same key unprefixed
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(WeightError, match=r"duplicate key '.*layers\.0\.mlp\.gate_proj\.bias'"):
        load_model(path)


def test_fused_parameters_hold_the_checkpoint_matrices(model_copy):
    """The loaded fused weights and biases are Hugging Face's, transposed and laid out as `layers` fuses them."""
    from qsjax.dense.layers import fuse_gate_up, fuse_qkv

    path, tensors = model_copy("llama-bias")
    blk = load_model(path).module().blocks[1]
    hf = lambda name: tensors[f"model.layers.1.{name}"]
    np.testing.assert_array_equal(blk.qkv_proj.w[...], fuse_qkv(*(hf(f"self_attn.{p}_proj.weight").T for p in "qkv"), 2))
    np.testing.assert_array_equal(blk.qkv_proj.b[...], fuse_qkv(*(hf(f"self_attn.{p}_proj.bias") for p in "qkv"), 2))
    np.testing.assert_array_equal(blk.gate_up_proj.w[...], fuse_gate_up(hf("mlp.gate_proj.weight").T, hf("mlp.up_proj.weight").T))
    np.testing.assert_array_equal(blk.gate_up_proj.b[...], fuse_gate_up(hf("mlp.gate_proj.bias"), hf("mlp.up_proj.bias")))
