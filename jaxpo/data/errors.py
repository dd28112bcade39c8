"""Bad-record errors and the counters that skipped, truncated and dropped records go into.

A record that fails validation raises :class:`BadRecordError` whose message names the file, the
line (JSONL) or row (Parquet, ArrayRecord, TFDS) and the field, e.g.
``data/train.jsonl:17: field 'scores': NaN``. With ``on_bad_record="skip"`` the same error is
caught, the record is skipped and its ``reason`` is counted in a :class:`RecordCounters`.
"""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass(frozen=True)
class Where:
    """Where a record came from: a file and a 1-based line (JSONL) or 0-based row number.

    Attributes:
      file: the file path (or ``tfds:name/split``).
      index: the line (JSONL, 1-based) or row (other formats, 0-based).
      unit: ``"line"`` or ``"row"``.
    """

    file: str = "<memory>"
    index: int = 0
    unit: str = "row"

    def __str__(self) -> str:
        if self.unit == "line":
            return f"{self.file}:{self.index}"
        return f"{self.file}:row {self.index}"


class BadRecordError(ValueError):
    """A record that cannot be trained on.

    Attributes:
      where: the record's :class:`Where` (file and line/row).
      field: the offending field, dotted for nested ones (``tree.children[1].score``).
      reason: a short machine-readable reason, the key it is counted under when skipped.
      detail: the human-readable explanation.
    """

    def __init__(self, where: Where | None, field: str, reason: str, detail: str):
        self.where = where or Where()
        self.field = field
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.where}: field '{field}': {detail}")

    def __reduce__(self):  # picklable across grain worker processes
        return (BadRecordError, (self.where, self.field, self.reason, self.detail))


class RecordCounters:
    """Counts of skipped, truncated and dropped records, keyed by ``"<event>/<reason>"``.

    Events: ``skipped`` (bad record, ``on_bad_record="skip"``), ``dropped`` (a valid group that
    cannot fit: prompt too long, fewer than 2 responses left, ...), ``dropped_response`` (one
    response removed from a group that survives), ``truncated`` (tokens cut: ``prompt`` or
    ``response``), and ``groups`` (groups built).

    >>> c = RecordCounters()
    >>> c.add("skipped/nan_score"); c.add("skipped/nan_score"); c.add("groups")
    >>> c.as_metrics()
    {'data/groups': 1, 'data/skipped/nan_score': 2}
    """

    def __init__(self, counts: dict[str, int] | None = None):
        self.counts: collections.Counter[str] = collections.Counter(counts or {})

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def merge(self, other: RecordCounters | dict[str, int]) -> None:
        """Adds another counter's (or a plain dict's) counts to this one."""
        self.counts.update(other.counts if isinstance(other, RecordCounters) else other)

    def total(self, event: str) -> int:
        """The sum over reasons of one event, e.g. ``total("skipped")``."""
        return sum(v for k, v in self.counts.items() if k == event or k.startswith(event + "/"))

    def as_metrics(self, prefix: str = "data/") -> dict[str, int]:
        """Flat ``{prefix + key: count}``, sorted by key, for the metrics writer."""
        return {prefix + k: int(v) for k, v in sorted(self.counts.items())}

    def __getitem__(self, key: str) -> int:
        return self.counts[key]

    def __repr__(self) -> str:
        return f"RecordCounters({dict(sorted(self.counts.items()))})"
