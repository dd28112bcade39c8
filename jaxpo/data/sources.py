"""Random-access record sources: JSONL (also ``.gz``), Parquet, ArrayRecord and TFDS.

A :class:`RecordSource` concatenates several files (glob patterns allowed) and serves
``source[i] -> RawRecord``: the raw dict plus its global index and its file and line/row, so that
errors name them. It has ``__len__`` and ``__getitem__`` and pickles without open file handles,
so it can back ``grain.MapDataset.source`` with worker processes.

Spec strings: a path or glob (``data/*.jsonl``, ``train.parquet``, ``shard-*.array_record``) or
``tfds:name[/config][:split]`` (needs the ``tfds`` extra).
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import gzip
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxpo.data.errors import BadRecordError, Where

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl.gz", ".json.gz": "jsonl.gz",
            ".parquet": "parquet", ".array_record": "array_record", ".arrayrecord": "array_record"}


@dataclasses.dataclass
class RawRecord:
    """One raw record and where it came from.

    Attributes:
      id: global index over all the source's files.
      data: the record as a dict (or whatever the file held, for the parser to reject).
      where: file and line (JSONL, 1-based) or row (0-based).
      error: a :class:`BadRecordError` when the bytes could not be decoded (``data`` is None).
    """

    id: int
    data: Any
    where: Where
    error: BadRecordError | None = None


def file_kind(path: str) -> str:
    """``jsonl``, ``jsonl.gz``, ``parquet`` or ``array_record`` from the file name."""
    name = path.lower()
    for suffix, kind in sorted(SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix) or (kind == "array_record" and suffix + "-" in name):
            return kind
    raise ValueError(f"{path}: unknown data file type (expected one of {sorted(SUFFIXES)})")


def expand(specs: str | Sequence[str]) -> list[str]:
    """Expands paths and glob patterns in order; a pattern that matches nothing is an error."""
    specs = [specs] if isinstance(specs, (str, os.PathLike)) else list(specs)
    out = []
    for spec in map(str, specs):
        if spec.startswith("tfds:"):
            out.append(spec)
            continue
        matches = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
        if not matches or not os.path.exists(matches[0]):
            raise FileNotFoundError(f"no data file matches {spec!r}")
        out.extend(matches)
    return out


class _Jsonl:
    """Line offsets of a JSONL file (decompressed into memory when gzipped); blank lines skipped."""

    def __init__(self, path: str, gz: bool):
        self.path, self.gz = path, gz
        if gz:
            data = np.frombuffer(self._bytes(), np.uint8)
        elif os.path.getsize(path):
            data = np.memmap(path, np.uint8, mode="r")
        else:
            data = np.zeros(0, np.uint8)
        ends = np.flatnonzero(data == 0x0A)  # [L] newline positions
        if len(data) and data[-1] != 0x0A:
            ends = np.append(ends, len(data))
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        length = ends - starts
        cr_only = (length == 1) & (data[np.minimum(starts, max(len(data) - 1, 0))] == 0x0D)
        keep = (length > 0) & ~cr_only
        self.line_numbers = np.flatnonzero(keep).astype(np.int64) + 1
        self.offsets = starts[keep]
        del data
        self._data: bytes | None = None
        self._fh = None

    def _bytes(self) -> bytes:
        opener = gzip.open if self.gz else open
        with opener(self.path, "rb") as f:
            return f.read()

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> tuple[Any, Where]:
        where = Where(self.path, int(self.line_numbers[i]), "line")
        if self.gz:
            if self._data is None:
                self._data = self._bytes()
            data, start = self._data, int(self.offsets[i])
            end = data.find(b"\n", start)
            line = data[start:end if end >= 0 else len(data)]
        else:
            if self._fh is None:
                self._fh = open(self.path, "rb")  # noqa: SIM115  kept open for random reads
            self._fh.seek(int(self.offsets[i]))
            line = self._fh.readline()
        try:
            return json.loads(line), where
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return BadRecordError(where, "<record>", "bad_json", f"invalid JSON: {e}"), where

    def __getstate__(self):
        return {**self.__dict__, "_fh": None, "_data": None}


class _Parquet:
    """Rows of a Parquet file, one row group decoded at a time."""

    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self.path = path
        meta = pq.ParquetFile(path).metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.starts = np.cumsum([0] + sizes)
        self._cache: tuple[int, list[dict]] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, i: int) -> tuple[Any, Where]:
        import pyarrow.parquet as pq

        g = int(np.searchsorted(self.starts, i, side="right") - 1)
        if self._cache is None or self._cache[0] != g:
            self._cache = (g, pq.ParquetFile(self.path).read_row_group(g).to_pylist())
        return self._cache[1][i - int(self.starts[g])], Where(self.path, i, "row")

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}


class _ArrayRecord:
    """Records of an ArrayRecord file; each record is one JSON object as UTF-8 bytes."""

    def __init__(self, path: str):
        self.path = path
        self._reader = None
        self._n = int(self._open().num_records())

    def _open(self):
        if self._reader is None:
            from array_record.python.array_record_module import ArrayRecordReader

            self._reader = ArrayRecordReader(self.path)
        return self._reader

    def __len__(self) -> int:
        return self._n

    def read(self, i: int) -> tuple[Any, Where]:
        where = Where(self.path, i, "row")
        raw = self._open().read([i])[0]
        try:
            return json.loads(raw), where
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return BadRecordError(where, "<record>", "bad_json", f"invalid JSON: {e}"), where

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}


class _Tfds:
    """A TFDS split through ``tfds.data_source`` (random access over ArrayRecord files)."""

    def __init__(self, spec: str):
        self.spec = spec
        rest = spec[len("tfds:"):]
        self.name, _, self.split = rest.partition(":")
        self.split = self.split or "train"
        self._ds = None
        self._n = len(self._open())

    def _open(self):
        if self._ds is None:
            try:
                import tensorflow_datasets as tfds
            except ImportError:
                raise ImportError(
                    f"{self.spec}: TFDS sources need tensorflow-datasets "
                    "(pip install 'jaxpo[tfds]')") from None
            self._ds = tfds.data_source(self.name, split=self.split)
        return self._ds

    def __len__(self) -> int:
        return self._n

    def read(self, i: int) -> tuple[Any, Where]:
        return _decode(self._open()[i]), Where(self.spec, i, "row")

    def __getstate__(self):
        return {**self.__dict__, "_ds": None}


def _decode(x: Any) -> Any:
    """TFDS features to plain Python: bytes → str, arrays → lists."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return [_decode(e) for e in x.tolist()] if x.dtype == object else x.tolist()
    if isinstance(x, dict):
        return {k: _decode(e) for k, e in x.items()}
    if isinstance(x, (list, tuple)):
        return [_decode(e) for e in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def open_file(spec: str):
    """The reader for one file or TFDS spec."""
    if spec.startswith("tfds:"):
        return _Tfds(spec)
    kind = file_kind(spec)
    if kind in ("jsonl", "jsonl.gz"):
        return _Jsonl(spec, gz=kind == "jsonl.gz")
    return _Parquet(spec) if kind == "parquet" else _ArrayRecord(spec)


class RecordSource:
    """Random access over the records of several files.

    >>> import json, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "d.jsonl")
    >>> lines = [json.dumps({"prompt": p, "chosen": "a", "rejected": "b"}) for p in "pq"]
    >>> with open(path, "w") as f:
    ...     _ = f.write(lines[0] + chr(10) * 2 + lines[1] + chr(10))
    >>> src = RecordSource(path)
    >>> len(src), src[1].data["prompt"], src[1].where.index
    (2, 'q', 3)
    """

    def __init__(self, files: str | Sequence[str]):
        """Args: files: paths, glob patterns or ``tfds:name:split`` specs (in order)."""
        self.files = expand(files)
        self._readers = [open_file(f) for f in self.files]
        self._starts = np.cumsum([0] + [len(r) for r in self._readers]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> RawRecord:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range [0, {len(self)})")
        f = bisect.bisect_right(self._starts, i) - 1
        data, where = self._readers[f].read(i - self._starts[f])
        if isinstance(data, BadRecordError):
            return RawRecord(i, None, where, data)
        return RawRecord(i, data, where)

    def __repr__(self) -> str:
        return f"RecordSource({len(self.files)} files, {len(self)} records)"
