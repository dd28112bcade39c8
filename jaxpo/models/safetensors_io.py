"""Safetensors files through the ``safetensors`` package, with one-line errors naming the file.

Reading is memory-mapped (``safetensors.safe_open``). :meth:`SafetensorsFile.read` takes an
index so that a caller building a sharded array (``jax.make_array_from_callback``) reads only
its slice of a tensor. bfloat16 tensors are ``ml_dtypes.bfloat16`` numpy arrays, the type JAX
uses, in both directions.

A checkpoint directory holds ``model.safetensors``, or files ``model-0000i-of-0000n.safetensors``
listed by ``model.safetensors.index.json`` (:class:`TensorDirectory` reads it,
:func:`save_directory` writes it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from typing import Self

import ml_dtypes  # noqa: F401  registers 'bfloat16' with numpy; safetensors' numpy BF16 needs it
import numpy as np
import safetensors
import safetensors.numpy

Index = tuple[slice | int, ...]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors reports a file whose size differs from what its (valid) header describes so.
_SIZE_MISMATCH = "not fully covered"


class SafetensorsFile:
    """One safetensors file, opened once and memory-mapped.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x.safetensors")
    >>> save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, path)
    >>> with SafetensorsFile(path) as f:
    ...     f.names(), f.shape("w"), f.dtype("w"), f.read("w", (slice(1, 2),)).tolist()
    (['w'], (2, 3), 'F32', [[3.0, 4.0, 5.0]])
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: safetensors file does not exist")
        self.path = path
        try:
            self._handle = safetensors.safe_open(path, framework="numpy")
        except safetensors.SafetensorError as e:
            if _SIZE_MISMATCH in str(e):
                raise ValueError(f"{path}: truncated or corrupt safetensors file: its size "
                                 f"({os.path.getsize(path)} bytes) does not match what its "
                                 "header describes") from None
            raise ValueError(f"{path}: the safetensors header is not valid ({e}); the file is "
                             "corrupt or not a safetensors file") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Releases the memory map."""
        self._handle.__exit__(None, None, None)

    def names(self) -> list[str]:
        """The tensor names in the file."""
        return list(self._handle.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` (read from the header only)."""
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype code of tensor ``name`` (``"F32"``, ``"BF16"``, ...)."""
        return self._slice(name).get_dtype()

    def read(self, name: str, index: Index | None = None) -> np.ndarray:
        """Tensor ``name``, or only ``tensor[index]`` (e.g. one device's shard)."""
        try:
            if index is None:
                return self._handle.get_tensor(name)
            return self._handle.get_slice(name)[index]
        except (safetensors.SafetensorError, TypeError) as e:
            raise ValueError(f"{self.path}: cannot read tensor '{name}': {e}") from None

    def _slice(self, name: str):
        try:
            return self._handle.get_slice(name)
        except safetensors.SafetensorError as e:
            raise ValueError(f"{self.path}: {e}") from None


def read_slice(path: str, name: str, index: Index | None = None) -> np.ndarray:
    """``tensor[index]`` of tensor ``name`` in the file ``path`` (all of it when ``index`` is None).

    Only the bytes of the slice are read from the memory-mapped file.
    """
    with SafetensorsFile(path) as f:
        return f.read(name, index)


def save_file(tensors: Mapping[str, np.ndarray], path: str) -> None:
    """Writes ``tensors`` to ``path`` with the metadata transformers expects (``format: pt``)."""
    arrays = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    safetensors.numpy.save_file(arrays, path, metadata={"format": "pt"})


class TensorDirectory:
    """The tensors of a checkpoint directory; each file is opened (memory-mapped) once, when
    first needed, and closed with the directory.

    Attributes:
      files: tensor name -> path of the file holding it.
    """

    def __init__(self, path: str):
        self.path = path
        self.files = _tensor_files(path)
        self._stack = contextlib.ExitStack()
        self._opened: dict[str, SafetensorsFile] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def open(self, name: str) -> SafetensorsFile:
        """The file holding tensor ``name``."""
        file = self.files[name]
        if file not in self._opened:
            self._opened[file] = self._stack.enter_context(SafetensorsFile(file))
        return self._opened[file]


def _tensor_files(path: str) -> dict[str, str]:
    """Maps every tensor name in the checkpoint directory ``path`` to the file holding it."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: missing field 'weight_map'")
        for file in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, file)):
                raise FileNotFoundError(f"{index}: lists {file}, which does not exist in {path}")
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, SINGLE)
    if not os.path.exists(single):
        found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        raise FileNotFoundError(
            f"{path}: no {SINGLE} or {INDEX}"
            + (f" (found {found[:3]} without an index)" if found else " and no *.safetensors")
            + "; only safetensors checkpoints are read, not pickled .bin files")
    with SafetensorsFile(single) as f:
        return {name: single for name in f.names()}


def save_directory(tensors: Mapping[str, np.ndarray], path: str,
                   max_shard_size: int | str = "5GB") -> list[str]:
    """Writes ``tensors`` into the directory ``path``, in their order: ``model.safetensors``, or
    files of at most ``max_shard_size`` bytes (int or ``"500MB"``, ``"5GB"``; one tensor larger
    than that gets a file of its own) with ``model.safetensors.index.json``.

    Returns:
      The file names written.
    """
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for name, array in tensors.items():
        if shards[-1] and sizes[-1] + array.nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = array
        sizes[-1] += array.nbytes
    os.makedirs(path, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE))
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(path, name))
        weight_map.update({tensor: name for tensor in shard})
    with open(os.path.join(path, INDEX), "w") as f:
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
