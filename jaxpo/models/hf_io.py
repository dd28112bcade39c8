"""Hugging Face checkpoint import and export.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``. HF linear weights
are ``[out, in]``; jaxpo keeps ``[in, ...]`` with heads split out (see :class:`Transformer`),
so each tensor is transposed and reshaped on the way in and back on the way out, exactly.

Files are read memory-mapped through the ``safetensors`` package (:mod:`safetensors_io`).
Loading fails early with one line naming the path, file or tensor: a missing directory or
weights file (``FileNotFoundError``); a truncated or corrupt file, a missing, unexpected,
wrongly shaped or non-finite (NaN/inf) tensor (``ValueError``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpo.models.config import ModelConfig, canonical_dtype
from jaxpo.models.safetensors_io import SafetensorsFile, save_file
from jaxpo.models.transformer import Transformer

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# Tensors some checkpoints carry that the model recomputes or does not need.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

Convert = Callable[[np.ndarray], np.ndarray]


def _param_table(cfg: ModelConfig) -> Iterator[tuple[str, tuple, Convert, Convert]]:
    """Yields ``(hf_name, jaxpo_path, hf_to_jaxpo, jaxpo_to_hf)`` for every parameter."""
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    same = (lambda w: w, lambda w: w)
    transpose = (lambda w: w.T, lambda w: w.T)

    def heads(n):  # [n * hd, D] <-> [D, n, hd]
        return (lambda w: w.T.reshape(d, n, hd), lambda w: w.reshape(d, n * hd).T)

    def head_bias(n):  # [n * hd] <-> [n, hd]
        return (lambda b: b.reshape(n, hd), lambda b: b.reshape(n * hd))

    out_proj = (lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(h * hd, d).T)

    yield ("model.embed_tokens.weight", ("embed",), *same)
    for i in range(cfg.num_layers):
        hf, jx = f"model.layers.{i}.", ("layers", i)
        yield (hf + "input_layernorm.weight", (*jx, "attn_norm", "scale"), *same)
        yield (hf + "post_attention_layernorm.weight", (*jx, "mlp_norm", "scale"), *same)
        for name, n in (("q", h), ("k", kv), ("v", kv)):
            yield (hf + f"self_attn.{name}_proj.weight", (*jx, "attn", name), *heads(n))
            if cfg.qkv_bias:
                yield (hf + f"self_attn.{name}_proj.bias", (*jx, "attn", f"{name}_bias"),
                       *head_bias(n))
        yield (hf + "self_attn.o_proj.weight", (*jx, "attn", "o"), *out_proj)
        if cfg.o_bias:
            yield (hf + "self_attn.o_proj.bias", (*jx, "attn", "o_bias"), *same)
        if cfg.qk_norm:
            yield (hf + "self_attn.q_norm.weight", (*jx, "attn", "q_norm", "scale"), *same)
            yield (hf + "self_attn.k_norm.weight", (*jx, "attn", "k_norm", "scale"), *same)
        for name in ("gate", "up", "down"):
            yield (hf + f"mlp.{name}_proj.weight", (*jx, "mlp", name), *transpose)
    yield ("model.norm.weight", ("norm", "scale"), *same)
    if not cfg.tie_word_embeddings:
        yield ("lm_head.weight", ("lm_head",), *same)


def _tensor_files(path: str) -> dict[str, str]:
    """Maps every tensor name in the checkpoint to the file holding it."""
    index = os.path.join(path, _INDEX)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: missing field 'weight_map'")
        for file in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, file)):
                raise FileNotFoundError(f"{index}: lists {file}, which does not exist in {path}")
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, _SINGLE)
    if not os.path.exists(single):
        found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        raise FileNotFoundError(
            f"{path}: no {_SINGLE} or {_INDEX}"
            + (f" (found {found[:3]} without an index)" if found else " and no *.safetensors")
            + "; only safetensors checkpoints are read, not pickled .bin files")
    with SafetensorsFile(single) as f:
        return {name: single for name in f.names()}


def _check_dir(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"model path {path} is a file; a checkpoint is a directory with "
                         "config.json and *.safetensors")


def read_config(path: str, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of the checkpoint directory ``path``."""
    _check_dir(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: config.json not found")
    with open(config_path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    return ModelConfig.from_hf(hf, source=config_path, **overrides)


def load_hf(path: str, *, dtype: Any = "float32", param_dtype: Any = "float32",
            **overrides: Any) -> Transformer:
    """Loads a local Hugging Face checkpoint directory into a :class:`Transformer`.

    Args:
      path: directory with ``config.json`` and safetensors weights (single or sharded).
      dtype: compute dtype, float32 or bfloat16, in any spelling (``jnp.bfloat16``, ``"bf16"``).
      param_dtype: parameter storage dtype, float32 or bfloat16, in any spelling.
      **overrides: other :class:`ModelConfig` fields (``remat``, ``attention``, ...).

    Returns:
      The model. A missing path or weights file raises ``FileNotFoundError``; a truncated or
      corrupt file, and missing, unexpected, wrongly shaped or non-finite tensors raise
      ``ValueError`` naming the tensor and its file.
    """
    cfg = read_config(path, dtype=dtype, param_dtype=param_dtype, **overrides)
    files = _tensor_files(path)
    table = list(_param_table(cfg))
    expected = {hf_name for hf_name, *_ in table}
    if cfg.tie_word_embeddings:
        expected.add("lm_head.weight")  # tied checkpoints may still store the copy
    unexpected = sorted(n for n in files if n not in expected and not _IGNORED.fullmatch(n))
    if unexpected:
        raise ValueError(f"unexpected tensor '{unexpected[0]}' in {files[unexpected[0]]} "
                         f"({len(unexpected)} in all) for a {cfg.model_type} model")
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))
    with contextlib.ExitStack() as stack:
        opened: dict[str, SafetensorsFile] = {}
        for hf_name, jx_path, to_jaxpo, to_hf in table:
            if hf_name not in files:
                raise ValueError(f"{path}: missing tensor '{hf_name}' for a {cfg.model_type} "
                                 "model")
            file = files[hf_name]
            if file not in opened:
                opened[file] = stack.enter_context(SafetensorsFile(file))
            array = opened[file].read(hf_name)
            target = variables[jx_path]
            want = to_hf_shape(target.get_value().shape, to_hf)
            if tuple(array.shape) != want:
                raise ValueError(f"tensor '{hf_name}' in {file} has shape "
                                 f"{list(array.shape)}; config.json implies {list(want)}")
            _check_finite(array, hf_name, file)
            target.set_value(jnp.asarray(to_jaxpo(array).astype(jnp.dtype(cfg.param_dtype))))
    return nnx.merge(graphdef, state)


def _check_finite(array: np.ndarray, name: str, file: str) -> None:
    """Raises when a float tensor holds NaN or inf; max and min find both without a copy."""
    if array.size == 0 or not jnp.issubdtype(array.dtype, jnp.floating):
        return
    if np.isfinite(array.max()) and np.isfinite(array.min()):
        return
    values = array.astype(np.float32)
    raise ValueError(f"tensor '{name}' in {file} is not finite: {int(np.isnan(values).sum())} "
                     f"NaN and {int(np.isinf(values).sum())} inf values")


def to_hf_shape(shape: tuple[int, ...], to_hf: Convert) -> tuple[int, ...]:
    """The HF tensor shape of a jaxpo parameter shape."""
    return to_hf(np.zeros(shape, np.int8)).shape


def export_hf(model: Transformer, path: str, *, dtype: Any = None,
              max_shard_size: int | str = "5GB") -> list[str]:
    """Writes ``model`` as a Hugging Face checkpoint directory (config.json + safetensors).

    Args:
      model: the model.
      path: output directory (created).
      dtype: tensor dtype in the files, float32 or bfloat16 in any spelling; default the
        param dtype.
      max_shard_size: bytes per file (int or ``"500MB"``, ``"5GB"``); larger models are
        sharded with ``model.safetensors.index.json``.

    Returns:
      The safetensors file names written.
    """
    cfg = model.config
    dtype = canonical_dtype(cfg.param_dtype if dtype is None else dtype)
    np_dtype = jnp.dtype(dtype)  # bfloat16 is ml_dtypes.bfloat16
    limit = _parse_size(max_shard_size)
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = {}
    for hf_name, jx_path, _, to_hf in _param_table(cfg):
        value = np.asarray(variables[jx_path].get_value())
        tensors[hf_name] = np.ascontiguousarray(to_hf(value.astype(np_dtype)))
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for name, array in tensors.items():
        if shards[-1] and sizes[-1] + array.nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = array
        sizes[-1] += array.nbytes
    os.makedirs(path, exist_ok=True)
    hf_config = dict(cfg.to_hf(), torch_dtype=dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, _SINGLE))
        return [_SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(path, name))
        weight_map.update({tensor: name for tensor in shard})
    with open(os.path.join(path, _INDEX), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f,
                  indent=2, sort_keys=True)
    return names


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: use an int or e.g. '500MB', '5GB'")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)]
    return int(float(match.group(1)) * scale)
