"""Safetensors files through the ``safetensors`` package, with one-line errors naming the file.

Reading is memory-mapped (``safetensors.safe_open``). :meth:`SafetensorsFile.read` takes an
index so that a caller building a sharded array (``jax.make_array_from_callback``) reads only
its slice of a tensor. bfloat16 tensors are ``ml_dtypes.bfloat16`` numpy arrays, the type JAX
uses, in both directions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import ml_dtypes  # noqa: F401  registers 'bfloat16' with numpy; safetensors' numpy BF16 needs it
import numpy as np
import safetensors
import safetensors.numpy

Index = tuple[slice | int, ...]

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

    def __enter__(self) -> SafetensorsFile:
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
