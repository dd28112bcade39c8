"""Hugging Face checkpoint import and export, whole or as sharded global arrays.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``. HF linear weights
are ``[out, in]``, one tensor per layer (``model.layers.{i}.self_attn.q_proj.weight``); jaxpo
keeps ``[in, ...]`` with heads split out and the layers stacked on a leading axis (see
:class:`Transformer`), so each tensor is reshaped and transposed, and the layers stacked, on
the way in, and back on the way out, exactly.

:func:`load_hf_params` builds each parameter directly as a sharded global ``jax.Array``
(``jax.make_array_from_callback``): each device's shard reads only its slice of each layer's
tensor from the memory-mapped file, so no host or device ever holds the whole model.
:func:`load_hf` reads it whole into a :class:`Transformer`.

Files are read memory-mapped through the ``safetensors`` package (:mod:`safetensors_io`).
Loading fails early with one line naming the path, file or tensor: a missing directory or
weights file (``FileNotFoundError``); a truncated or corrupt file, a missing, unexpected,
wrongly shaped or non-finite (NaN/inf) tensor (``ValueError``). Names and shapes are checked
from the file headers before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpo.models import lora
from jaxpo.models.config import ModelConfig, canonical_dtype
from jaxpo.models.safetensors_io import Index, TensorDirectory, save_directory
from jaxpo.models.transformer import Transformer

# Tensors some checkpoints carry that the model recomputes or does not need.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_LAYER = "model.layers.{i}."


@dataclasses.dataclass(frozen=True)
class _Param:
    """A jaxpo parameter and the Hugging Face tensor(s) it is stored as.

    The HF tensor, each of its axes split into the sizes ``hf_axes`` lists for it and the
    result transposed by ``perm``, is the parameter; for a stacked parameter (``hf`` holds
    ``{i}``) it is layer ``i`` of it. E.g. ``q_proj`` ``[H * hd, D]``: ``hf_axes`` ``((H, hd),
    (D,))``, ``perm`` ``(2, 0, 1)`` gives ``attn.q`` ``[D, H, hd]``.
    """

    path: tuple[str, ...]  # jaxpo parameter path
    hf: str  # HF tensor name; "{i}" stands for the layer
    hf_axes: tuple[tuple[int, ...], ...]  # per HF axis, the sizes of the axes it is split into
    perm: tuple[int, ...]  # jaxpo axis j is split axis perm[j]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(sizes) for sizes in self.hf_axes)

    def to_jaxpo(self, w: np.ndarray) -> np.ndarray:
        """One HF tensor -> the parameter (one layer of it when stacked)."""
        return w.reshape([n for sizes in self.hf_axes for n in sizes]).transpose(self.perm)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_jaxpo`."""
        return x.transpose(np.argsort(self.perm)).reshape(self.hf_shape)

    def hf_slice(self, index: tuple[slice, ...]) -> tuple[tuple[slice, ...], tuple[int, ...],
                                                          tuple[slice, ...]]:
        """What to read for ``param[index]`` (one layer's axes; slices with start and stop).

        Returns ``(hf_index, block_shape, within)``: read ``tensor[hf_index]``, reshape it to
        ``block_shape``, take ``[within]`` and transpose by ``perm``. An HF axis holding several
        jaxpo axes (``H * hd``) is read as a range of its first one with the others whole, the
        exact slice unless one of the others (``head_dim``) is sharded too.
        """
        split = [slice(None)] * len(self.perm)
        for j, axis in enumerate(self.perm):
            split[axis] = index[j]
        hf_index, block_shape, within = [], [], []
        axis = 0
        for sizes in self.hf_axes:
            outer, inner = split[axis], split[axis + 1:axis + len(sizes)]
            stride = math.prod(sizes[1:])
            hf_index.append(slice(outer.start * stride, outer.stop * stride))
            block_shape += [outer.stop - outer.start, *sizes[1:]]
            within += [slice(None), *inner]
            axis += len(sizes)
        return tuple(hf_index), tuple(block_shape), tuple(within)


def _param_table(cfg: ModelConfig) -> list[_Param]:
    """Every parameter of ``cfg``'s model and its HF tensor(s), in HF's order within a layer."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def param(path: str, hf: str, hf_axes: tuple, perm: tuple | None = None) -> _Param:
        perm = tuple(range(sum(map(len, hf_axes)))) if perm is None else perm
        return _Param(tuple(path.split(".")), hf, hf_axes, perm)

    table = [param("embed", "model.embed_tokens.weight", ((v,), (d,)))]
    table += [param("layers.attn_norm.scale", _LAYER + "input_layernorm.weight", ((d,),)),
              param("layers.mlp_norm.scale", _LAYER + "post_attention_layernorm.weight", ((d,),))]
    for name, n in (("q", h), ("k", kv), ("v", kv)):  # [n * hd, D] <-> [D, n, hd]
        table.append(param(f"layers.attn.{name}", _LAYER + f"self_attn.{name}_proj.weight",
                           ((n, hd), (d,)), (2, 0, 1)))
        if cfg.qkv_bias:  # [n * hd] <-> [n, hd]
            table.append(param(f"layers.attn.{name}_bias", _LAYER + f"self_attn.{name}_proj.bias",
                               ((n, hd),)))
    table.append(param("layers.attn.o", _LAYER + "self_attn.o_proj.weight",  # [D, H * hd]
                       ((d,), (h, hd)), (1, 2, 0)))  # <-> [H, hd, D]
    if cfg.o_bias:
        table.append(param("layers.attn.o_bias", _LAYER + "self_attn.o_proj.bias", ((d,),)))
    if cfg.qk_norm:
        table += [param("layers.attn.q_norm.scale", _LAYER + "self_attn.q_norm.weight", ((hd,),)),
                  param("layers.attn.k_norm.scale", _LAYER + "self_attn.k_norm.weight", ((hd,),))]
    for name, hf_axes in (("gate", ((f,), (d,))), ("up", ((f,), (d,))), ("down", ((d,), (f,)))):
        table.append(param(f"layers.mlp.{name}", _LAYER + f"mlp.{name}_proj.weight", hf_axes,
                           (1, 0)))
    table.append(param("norm.scale", "model.norm.weight", ((d,),)))
    if cfg.head == "reward":  # *ForSequenceClassification's score [1, D] <-> [D, 1]
        table.append(param("score", "score.weight", ((1,), (d,)), (1, 0)))
    elif not cfg.tie_word_embeddings:
        table.append(param("lm_head", "lm_head.weight", ((v,), (d,))))
    return table


def _hf_tensors(table: list[_Param], num_layers: int) -> Iterator[tuple[str, _Param, int | None]]:
    """``(hf_name, param, layer)`` in HF's order: embeddings, layer by layer, norm, head."""
    layer_params = [p for p in table if p.stacked]
    for p in table:
        if not p.stacked:
            yield p.hf, p, None
        elif p is layer_params[0]:
            for i in range(num_layers):
                for q in layer_params:
                    yield q.hf.format(i=i), q, i


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


class _Checkpoint(TensorDirectory):
    """A checkpoint directory read as the parameters of a model."""

    def check(self, cfg: ModelConfig, table: list[_Param], *, from_lm: bool = False) -> None:
        """Raises on an unexpected, missing or wrongly shaped tensor (file headers only).
        ``from_lm``: a reward model read from a causal LM's checkpoint (no ``score.weight``;
        its ``lm_head.weight`` is not read)."""
        if from_lm:
            table = [p for p in table if p.path != ("score",)]
        tensors = list(_hf_tensors(table, cfg.num_layers))
        expected = {name for name, _, _ in tensors}
        if cfg.tie_word_embeddings or from_lm:
            expected.add("lm_head.weight")  # tied checkpoints may still store the copy
        unexpected = sorted(n for n in self.files if n not in expected and not _IGNORED.fullmatch(n))
        if unexpected:
            raise ValueError(f"unexpected tensor '{unexpected[0]}' in {self.files[unexpected[0]]} "
                             f"({len(unexpected)} in all) for a {cfg.model_type} model")
        for name, param, _ in tensors:
            if name not in self.files:
                raise ValueError(f"{self.path}: missing tensor '{name}' for a {cfg.model_type} "
                                 "model")
            shape = self.open(name).shape(name)
            if shape != param.hf_shape:
                raise ValueError(f"tensor '{name}' in {self.files[name]} has shape {list(shape)}; "
                                 f"config.json implies {list(param.hf_shape)}")

    def read(self, param: _Param, index: tuple[slice, ...]) -> np.ndarray:
        """``param[index]`` in the file's dtype, reading only the slices of the HF tensors (of
        each layer in ``index[0]`` when stacked) that it needs; each checked to be finite."""
        if not param.stacked:
            return self._read_one(param.hf, param, index)
        layers, index = index[0], index[1:]
        return np.stack([self._read_one(param.hf.format(i=i), param, index)
                         for i in range(layers.start, layers.stop)])

    def _read_one(self, name: str, param: _Param, index: tuple[slice, ...]) -> np.ndarray:
        hf_index, block_shape, within = param.hf_slice(index)
        f = self.open(name)
        whole = all(s == slice(0, n) for s, n in zip(hf_index, param.hf_shape))
        block = f.read(name, None if whole else hf_index)
        _check_finite(block, name, f.path, None if whole else hf_index)
        return block.reshape(block_shape)[within].transpose(param.perm)


# The config fields that decide the parameters' names and shapes.
_STRUCTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "tie_word_embeddings", "qkv_bias", "o_bias", "qk_norm")


def load_hf_params(path: str, cfg: ModelConfig, shardings: Any = None) -> nnx.State:
    """The parameters of the checkpoint ``path``, each built directly as a sharded global array.

    Every parameter is assembled by ``jax.make_array_from_callback``: the shard of each
    addressable device reads only its slice of the parameter, from each layer's tensor in the
    memory-mapped file, checks it is finite and casts it to ``cfg.param_dtype``. No host or
    device holds more than its shards and one parameter's local slices at a time. Devices
    holding the same slice (replicated mesh axes) share one read.

    Args:
      path: checkpoint directory (single or sharded safetensors).
      cfg: the model's config, e.g. ``read_config(path, dtype=..., param_dtype=...)``; its
        parameter shapes must be those of ``path``'s ``config.json``.
      shardings: an ``nnx.State`` of ``jax.sharding.Sharding`` s shaped like the model's
        parameters (:func:`jaxpo.sharding.param_shardings`, a train state's
        ``state_shardings(...).params``); None: whole arrays on the default device.

    Returns:
      The ``nnx.State`` of the :class:`Transformer`'s ``nnx.Param`` s (its ``split`` layout);
      :func:`load_hf`'s errors.
    """
    on_disk = read_config(path)
    for field in _STRUCTURE:
        if getattr(on_disk, field) != getattr(cfg, field):
            raise ValueError(f"{path}: config.json has {field}={getattr(on_disk, field)!r}, but "
                             f"the model config has {getattr(cfg, field)!r}")
    return _load(path, cfg, shardings)[1]


def _load(path: str, cfg: ModelConfig, shardings: Any) -> tuple[nnx.GraphDef, nnx.State,
                                                              nnx.State]:
    """``(graphdef, params, rest)`` of the model of ``cfg`` with the checkpoint's weights."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    variables = dict(nnx.to_flat_state(params))
    placement = None
    if shardings is not None:
        placement = {path: s.get_value() if isinstance(s, nnx.Variable) else s
                     for path, s in nnx.to_flat_state(shardings)}
    dtype = jnp.dtype(cfg.param_dtype)
    table = _param_table(cfg)
    with _Checkpoint(path) as checkpoint:
        # A reward model started from a causal LM's checkpoint: the LM's decoder and a zero
        # score head, so that every reward starts at 0 (its lm_head is not read).
        from_lm = cfg.head == "reward" and "score.weight" not in checkpoint.files
        checkpoint.check(cfg, table, from_lm=from_lm)
        for param in table:
            target = variables[param.path]
            shape = target.get_value().shape

            def read(index: Index, param=param, shape=shape) -> np.ndarray:
                index = _normalize(index, shape)
                if from_lm and param.path == ("score",):
                    return np.zeros([s.stop - s.start for s in index], dtype)
                return checkpoint.read(param, index).astype(dtype, copy=False)

            if placement is None:
                value = jnp.asarray(read((slice(None),) * len(shape)))
            elif param.path not in placement:
                raise ValueError(f"shardings has no entry for parameter '{'/'.join(param.path)}'")
            else:
                value = jax.make_array_from_callback(shape, placement[param.path],
                                                     _once_per_slice(read), dtype=dtype)
            target.set_value(value)
    return graphdef, params, rest


def _normalize(index: Index, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A shard index with explicit starts and stops (``slice(None)`` -> ``slice(0, n)``)."""
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"shard index {index} has a step; expected contiguous slices")
        out.append(slice(start, stop))
    return tuple(out)


def _once_per_slice(read):
    """``read`` as a ``make_array_from_callback`` callback that reads each distinct slice once."""
    done: dict[tuple, np.ndarray] = {}

    def callback(index: Index) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in done:
            done[key] = read(index)
        return done[key]

    return callback


def load_hf(path: str, *, dtype: Any = "float32", param_dtype: Any = "float32",
            **overrides: Any) -> Transformer:
    """Loads a local Hugging Face checkpoint directory into a :class:`Transformer`.

    Args:
      path: directory with ``config.json`` and safetensors weights (single or sharded).
      dtype: compute dtype, float32 or bfloat16, in any spelling (``jnp.bfloat16``, ``"bf16"``).
      param_dtype: parameter storage dtype, float32 or bfloat16, in any spelling.
      **overrides: other :class:`ModelConfig` fields (``remat``, ``attention``, ...).

    Returns:
      The model, on the default device. A missing path or weights file raises
      ``FileNotFoundError``; a truncated or corrupt file, and missing, unexpected, wrongly
      shaped or non-finite tensors raise ``ValueError`` naming the tensor and its file.
    """
    cfg = read_config(path, dtype=dtype, param_dtype=param_dtype, **overrides)
    return nnx.merge(*_load(path, cfg, None))


def _check_finite(array: np.ndarray, name: str, file: str,
                  index: tuple[slice, ...] | None = None) -> None:
    """Raises when a float tensor (or the ``index`` slice read of it) holds NaN or inf; max and
    min find both without a copy."""
    if array.size == 0 or not jnp.issubdtype(array.dtype, jnp.floating):
        return
    if np.isfinite(array.max()) and np.isfinite(array.min()):
        return
    values = array.astype(np.float32)
    where = "" if index is None else " in its slice [{}]".format(
        ", ".join(f"{s.start}:{s.stop}" for s in index))
    raise ValueError(f"tensor '{name}' in {file} is not finite: {int(np.isnan(values).sum())} "
                     f"NaN and {int(np.isinf(values).sum())} inf values{where}")


def export_hf(model: Transformer, path: str, *, dtype: Any = None,
              max_shard_size: int | str = "5GB") -> list[str]:
    """Writes ``model`` as a Hugging Face checkpoint directory (config.json + safetensors).

    The stacked layers are written as HF's per-layer tensors, in HF's order. A model with LoRA
    adapters is written merged, ``W + (α/r)·A·B`` (:func:`jaxpo.models.lora.merged`); its
    adapters alone are :func:`jaxpo.models.lora.export_peft`.

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
    params = nnx.state(model, nnx.Param)
    if cfg.lora is not None:  # an adapted model is written as the base model it equals
        params, cfg = lora.merged(params, cfg.lora), cfg.replace(lora=None)
    variables = dict(nnx.to_flat_state(params))
    values: dict[tuple[str, ...], np.ndarray] = {}
    tensors = {}
    for name, param, layer in _hf_tensors(_param_table(cfg), cfg.num_layers):
        if param.path not in values:
            values[param.path] = np.asarray(variables[param.path].get_value()).astype(np_dtype)
        value = values[param.path] if layer is None else values[param.path][layer]
        tensors[name] = np.ascontiguousarray(param.to_hf(value))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(cfg.to_hf(), torch_dtype=dtype), f, indent=2, sort_keys=True)
    return save_directory(tensors, path, max_shard_size)
