"""Minimal safetensors reader and writer on numpy (bfloat16 through ``ml_dtypes``).

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets"}`` (offsets into the data that follows), then the data.
Nothing is unpickled; only plain little-endian arrays are read.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_header(path: str) -> dict[str, dict]:
    """The tensor entries of a safetensors file (``__metadata__`` removed)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > os.path.getsize(path) - 8:
            raise ValueError(f"{path}: corrupt safetensors header (length {size})")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def load_file(path: str, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Reads tensors (all, or ``names``) of a safetensors file as numpy arrays (memory-mapped)."""
    header = read_header(path)
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    out = {}
    for name in names if names is not None else header:
        entry = header[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        out[name] = data[begin:end].view(dtype).reshape(entry["shape"])
    return out


def save_file(tensors: dict[str, np.ndarray], path: str,
              metadata: dict[str, str] | None = None) -> None:
    """Writes ``tensors`` to ``path`` (names sorted, data contiguous, header 8-byte aligned)."""
    header: dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor '{name}': dtype {array.dtype} cannot be written")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())
