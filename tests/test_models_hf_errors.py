"""load_hf on broken checkpoints: one-line errors naming the path, file or tensor; dtypes."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from jaxpo.models import load_hf
from jaxpo.models.config import canonical_dtype, get_preset

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "models")
LLAMA = os.path.join(FIXTURES, "llama")


def _copy(tmp_path, name="llama"):
    out = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), out)
    return out


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_path_says_it_does_not_exist(tmp_path):
    path = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError) as err:
        load_hf(path)
    assert f"{path} does not exist" in _one_line(err)


def test_no_safetensors_names_the_directory(tmp_path):
    shutil.copy(os.path.join(LLAMA, "config.json"), tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(FileNotFoundError) as err:
        load_hf(str(tmp_path))
    message = _one_line(err)
    assert message.startswith(f"{tmp_path}: no model.safetensors")
    assert "no *.safetensors" in message


def test_index_listing_a_missing_shard_names_it(tmp_path):
    out = _copy(tmp_path)
    (out / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(FileNotFoundError) as err:
        load_hf(str(out))
    assert "model-00002-of-00002.safetensors, which does not exist" in _one_line(err)


def test_truncated_file_is_named(tmp_path):
    out = _copy(tmp_path)
    file = out / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as err:
        load_hf(str(out))
    message = _one_line(err)
    assert str(file) in message and "truncated or corrupt" in message


@pytest.mark.parametrize("corrupt", [
    lambda data: b"\xde\xad\xbe\xef garbage" + data[16:],  # the header length
    lambda data: data[:8] + b"\x00\xff" * 4 + data[16:],  # the JSON after a valid length
], ids=["length", "json"])
def test_corrupt_header_is_named(tmp_path, corrupt):
    out = _copy(tmp_path)
    file = out / "model.safetensors"
    file.write_bytes(corrupt(file.read_bytes()))
    with pytest.raises(ValueError) as err:
        load_hf(str(out))
    message = _one_line(err)
    assert str(file) in message and "header is not valid" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_non_finite_tensor_is_named(tmp_path, bad, dtype):
    out = _copy(tmp_path)
    file = str(out / "model.safetensors")
    tensors = safetensors.numpy.load_file(file)
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors = {k: v.astype(jnp.dtype(dtype)) for k, v in tensors.items()}
    tensors[name][3, 5] = bad
    safetensors.numpy.save_file(tensors, file)
    with pytest.raises(ValueError) as err:
        load_hf(str(out))
    message = _one_line(err)
    assert f"tensor '{name}' in {file} is not finite" in message
    assert ("1 NaN" if np.isnan(bad) else "1 inf") in message


def test_finite_checkpoint_still_loads_with_extreme_values(tmp_path):
    out = _copy(tmp_path)
    file = str(out / "model.safetensors")
    tensors = safetensors.numpy.load_file(file)
    tensors["model.norm.weight"][0] = np.finfo(np.float32).max
    safetensors.numpy.save_file(tensors, file)
    model = load_hf(str(out))
    assert float(model.norm.scale.get_value()[0]) == np.finfo(np.float32).max


@pytest.mark.parametrize("spelling, want", [
    (jnp.float32, "float32"), (jnp.bfloat16, "bfloat16"), (np.dtype("float32"), "float32"),
    (np.float32, "float32"), ("float32", "float32"), ("bfloat16", "bfloat16"),
    ("bf16", "bfloat16"), ("fp32", "float32"), ("f32", "float32"), ("BF16", "bfloat16"),
])
def test_dtype_spellings_are_canonical(spelling, want):
    assert canonical_dtype(spelling) == want
    cfg = get_preset("tiny", dtype=spelling, param_dtype=spelling)
    assert cfg.dtype == want and cfg.param_dtype == want


@pytest.mark.parametrize("spelling", [jnp.int8, "int8", np.float64, "fp16", "half", None, 3])
def test_unsupported_dtype_is_a_value_error(spelling):
    with pytest.raises(ValueError, match="is not supported; use float32 or bfloat16"):
        canonical_dtype(spelling)
    with pytest.raises(ValueError, match=r"ModelConfig\.param_dtype="):
        load_hf(LLAMA, param_dtype=spelling)


def test_load_hf_accepts_jnp_dtypes():
    model = load_hf(LLAMA, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert (model.config.dtype, model.config.param_dtype) == ("bfloat16", "float32")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
        np.dtype("float32")}
    model = load_hf(LLAMA, dtype="fp32", param_dtype="bf16")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
        jnp.dtype("bfloat16")}
