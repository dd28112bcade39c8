"""Random-access record sources: JSONL (also ``.gz``), Parquet, ArrayRecord and TFDS.

A :class:`RecordSource` concatenates several files (glob patterns allowed) and serves
``source[i] -> RawRecord``: the raw dict plus its global index and its file and line/row, so that
errors name them. It has ``__len__`` and ``__getitem__`` and pickles without open file handles,
so it can back ``grain.MapDataset.source`` with worker processes.

Spec strings: a path or glob (``data/*.jsonl``, ``train.parquet``, ``shard-*.array_record``) or
``tfds:name[/config][:split]`` (needs the ``tfds`` extra).

Memory stays bounded by the records actually read: a JSONL file is indexed in one streaming pass
(line offsets only) and a JSONL line or ArrayRecord record over ``max_record_bytes`` is never
decoded; it becomes a ``too_large`` bad record naming its file and line. A file without a single
record is an error (``FILE: no records (the file is empty)``), not an empty dataset.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import gzip
import json
import os
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxpo.config import DataConfig
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


_CHUNK = 1 << 24  # bytes read at a time while indexing a JSONL file


def _index_lines(f: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Line starts, lengths and 1-based numbers of the non-blank lines of a binary stream.

    Reads ``_CHUNK`` bytes at a time, so memory does not grow with the file or a line (only
    with the number of lines). A line is blank when it is empty or a lone carriage return.

    Returns:
      ``(starts [L], lengths [L], line_numbers [L], total bytes)``; lengths exclude the newline.
    """
    buf = bytearray(_CHUNK)
    ends, cr_before = [], []  # per newline: its offset; whether a carriage return precedes it
    pos, last = 0, 0  # bytes read so far; the last byte read
    while n := f.readinto(buf):
        chunk = np.frombuffer(buf, np.uint8, n)  # [n]
        nl = np.flatnonzero(chunk == 0x0A)  # [l] newlines in this chunk
        before = np.where(nl > 0, chunk[np.maximum(nl - 1, 0)], last)  # [l]
        ends.append(nl + pos)
        cr_before.append(before == 0x0D)
        pos, last = pos + n, int(chunk[-1])
    if pos and last != 0x0A:  # a last line without a newline ends at the end of the file
        ends.append(np.asarray([pos]))
        cr_before.append(np.asarray([last == 0x0D]))
    ends_all = np.concatenate(ends).astype(np.int64) if ends else np.zeros(0, np.int64)  # [L']
    cr = np.concatenate(cr_before) if cr_before else np.zeros(0, bool)  # [L']
    starts = np.concatenate([np.zeros(min(len(ends_all), 1), np.int64), ends_all[:-1] + 1])
    lengths = ends_all - starts  # [L']
    keep = (lengths > 0) & ~((lengths == 1) & cr)
    return starts[keep], lengths[keep], np.flatnonzero(keep).astype(np.int64) + 1, pos


def _too_large(where: Where, size: int, limit: int) -> BadRecordError:
    return BadRecordError(where, "<record>", "too_large",
                          f"record is {size} bytes, over data.max_record_bytes={limit}")


class _Jsonl:
    """Line offsets of a JSONL file (decompressed into memory when gzipped); blank lines skipped.

    The offsets come from one streaming pass (:func:`_index_lines`); a line longer than
    ``max_record_bytes`` is never read, it becomes a ``too_large`` bad record.
    """

    def __init__(self, path: str, gz: bool, max_record_bytes: int):
        self.path, self.gz, self.max_record_bytes = path, gz, max_record_bytes
        opener = gzip.open if gz else open
        with opener(path, "rb") as f:
            self.offsets, self.lengths, self.line_numbers, self.num_bytes = _index_lines(f)
        self._data: bytes | None = None
        self._fh = None

    def empty_reason(self) -> str:
        return "the file is empty" if self.num_bytes == 0 else "only blank lines"

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> tuple[Any, Where]:
        where = Where(self.path, int(self.line_numbers[i]), "line")
        start, length = int(self.offsets[i]), int(self.lengths[i])
        if length > self.max_record_bytes:
            return _too_large(where, length, self.max_record_bytes), where
        if self.gz:
            if self._data is None:
                with gzip.open(self.path, "rb") as f:
                    self._data = f.read()
            line = self._data[start:start + length]
        else:
            if self._fh is None:
                self._fh = open(self.path, "rb")  # noqa: SIM115  kept open for random reads
            self._fh.seek(start)
            line = self._fh.read(length)
        return _decode_json(line, where), where

    def __getstate__(self):
        return {**self.__dict__, "_fh": None, "_data": None}


def _decode_json(data: bytes, where: Where) -> Any:
    """A record's JSON, or a :class:`BadRecordError` for invalid or too deeply nested JSON."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return BadRecordError(where, "<record>", "bad_json", f"invalid JSON: {e}")
    except RecursionError:
        return BadRecordError(where, "<record>", "too_deep", "JSON nested too deeply to decode")


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

    def __init__(self, path: str, max_record_bytes: int):
        self.path, self.max_record_bytes = path, max_record_bytes
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
        if len(raw) > self.max_record_bytes:
            return _too_large(where, len(raw), self.max_record_bytes), where
        return _decode_json(raw, where), where

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


def open_file(spec: str, max_record_bytes: int = DataConfig.max_record_bytes):
    """The reader for one file or TFDS spec.

    Raises:
      ValueError: ``FILE: no records (the file is empty)``, or ``(only blank lines)``, or
        ``(0 rows)``.
    """
    if spec.startswith("tfds:"):
        reader = _Tfds(spec)
    else:
        kind = file_kind(spec)
        try:
            if kind in ("jsonl", "jsonl.gz"):
                reader = _Jsonl(spec, kind == "jsonl.gz", max_record_bytes)
            elif kind == "parquet":
                reader = _Parquet(spec)
            else:
                reader = _ArrayRecord(spec, max_record_bytes)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise ValueError(f"{spec}: cannot read the {kind} file: {e}") from None
        except Exception as e:  # pyarrow.ArrowInvalid, array_record's status errors
            if type(e).__module__.split(".")[0] not in ("pyarrow", "array_record"):
                raise
            raise ValueError(f"{spec}: not a valid {kind} file: {e}") from None
    if len(reader) == 0:
        why = reader.empty_reason() if isinstance(reader, _Jsonl) else "0 rows"
        raise ValueError(f"{spec}: no records ({why})")
    return reader


class RecordSource:
    """Random access over the records of several files.

    Args:
      files: paths, glob patterns or ``tfds:name:split`` specs (in order).
      max_record_bytes: a JSONL line or ArrayRecord record larger than this is not decoded:
        ``source[i].error`` is a ``too_large`` :class:`BadRecordError` (``data.max_record_bytes``).

    Raises:
      FileNotFoundError: a pattern matches no file.
      ValueError: a file holds no records (``FILE: no records (the file is empty)``).

    >>> import json, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "d.jsonl")
    >>> lines = [json.dumps({"prompt": p, "chosen": "a", "rejected": "b"}) for p in "pq"]
    >>> with open(path, "w") as f:
    ...     _ = f.write(lines[0] + chr(10) * 2 + lines[1] + chr(10))
    >>> src = RecordSource(path)
    >>> len(src), src[1].data["prompt"], src[1].where.index
    (2, 'q', 3)
    """

    def __init__(self, files: str | Sequence[str], *,
                 max_record_bytes: int = DataConfig.max_record_bytes):
        self.files = expand(files)
        self._readers = [open_file(f, max_record_bytes) for f in self.files]
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
