"""HF checkpoints: conformance with transformers' logits, exact export round trips, errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from jaxpo.models import Transformer, export_hf, get_preset, load_hf
from jaxpo.models.safetensors_io import SafetensorsFile, read_slice, save_file

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "models")
NAMES = ["llama", "qwen2", "qwen3"]
_forward = nnx.jit(lambda model, tokens: model(tokens))


def _params(model):
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    path = os.path.join(FIXTURES, request.param)
    return path, load_hf(path), np.load(os.path.join(path, "expected.npz"))


def test_logits_match_transformers(fixture):
    _, model, expected = fixture
    logits = np.asarray(_forward(model, jnp.asarray(expected["input_ids"])))
    assert logits.shape == expected["logits"].shape
    assert np.abs(logits - expected["logits"]).max() <= 1e-4


def test_export_reload_is_exact(fixture, tmp_path):
    path, model, expected = fixture
    files = export_hf(model, str(tmp_path))
    assert files == ["model.safetensors"]
    # The exported tensors equal the original checkpoint's, read by the safetensors library.
    original = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
    exported = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, array in original.items():
        np.testing.assert_array_equal(exported[name], array, err_msg=name)
    reloaded = load_hf(str(tmp_path))
    assert reloaded.config == model.config
    before, after = _params(model), _params(reloaded)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    tokens = jnp.asarray(expected["input_ids"])
    np.testing.assert_array_equal(_forward(reloaded, tokens), _forward(model, tokens))


def test_sharded_export_reloads(tmp_path):
    model = load_hf(os.path.join(FIXTURES, "qwen3"))
    files = export_hf(model, str(tmp_path), max_shard_size="40KB")
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == files
    sizes = [os.path.getsize(tmp_path / name) for name in files]
    assert max(sizes) < 40_000 + 4096  # a shard exceeds the limit only for one big tensor
    before, after = _params(model), _params(load_hf(str(tmp_path)))
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_bf16_checkpoint_round_trip(tmp_path):
    cfg = get_preset("tiny-qwen2", vocab_size=32, num_layers=1, param_dtype="bfloat16")
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    export_hf(model, str(tmp_path))
    with SafetensorsFile(str(tmp_path / "model.safetensors")) as f:
        assert {f.dtype(name) for name in f.names()} == {"BF16"}
    reloaded = load_hf(str(tmp_path), param_dtype="bfloat16")
    before, after = _params(model), _params(reloaded)
    for name in before:
        assert after[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(after[name].view(np.uint16), before[name].view(np.uint16))
    as_f32 = load_hf(str(tmp_path))  # bf16 file into fp32 params: exact widening
    np.testing.assert_array_equal(_params(as_f32)["embed"], before["embed"].astype(np.float32))


def test_safetensors_writer_is_readable_by_the_library(tmp_path):
    bf16 = np.array([1.5, -2.0, 3.25e38, 1e-39], np.float32).astype(ml_dtypes.bfloat16)
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int64),
              "c": bf16}
    path = str(tmp_path / "x.safetensors")
    save_file(arrays, path)
    loaded = safetensors.numpy.load_file(path)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name].view(np.uint8), array.view(np.uint8))
    with safetensors.safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses files without it


def test_read_slice_reads_part_of_one_tensor(tmp_path):
    w = np.arange(24, dtype=np.float32).reshape(4, 6)
    path = str(tmp_path / "x.safetensors")
    save_file({"w": w, "v": np.zeros(2, np.float32)}, path)
    np.testing.assert_array_equal(read_slice(path, "w", (slice(2, 4), slice(0, 3))), w[2:4, :3])
    np.testing.assert_array_equal(read_slice(path, "w"), w)
    with pytest.raises(ValueError, match=r"x\.safetensors: cannot read tensor 'u'"):
        read_slice(path, "u")


def _copy(name, tmp_path):
    out = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), out)
    return out, safetensors.numpy.load_file(str(out / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    out, tensors = _copy("llama", tmp_path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj"):
        load_hf(str(out))


def test_unexpected_tensor_is_named_with_its_file(tmp_path):
    out, tensors = _copy("qwen3", tmp_path)
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros(2, np.float32)
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra"
                       r"\.weight' in .*model\.safetensors"):
        load_hf(str(out))


def test_wrong_shape_is_named(tmp_path):
    out, tensors = _copy("qwen2", tmp_path)
    tensors["model.layers.0.self_attn.k_proj.bias"] = np.zeros(7, np.float32)
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"k_proj\.bias' in .* has shape \[7\]; .* \[32\]"):
        load_hf(str(out))


def test_no_weights_file(tmp_path):
    shutil.copy(os.path.join(FIXTURES, "llama", "config.json"), tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(str(tmp_path))


def test_load_options_are_applied():
    model = load_hf(os.path.join(FIXTURES, "llama"), dtype="bfloat16", remat="full")
    assert model.config.dtype == "bfloat16" and model.config.remat == "full"
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype("float32")}
