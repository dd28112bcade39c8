"""The grain pipeline: records → tokenised groups → fixed-shape batches, resumable.

The chain reads top to bottom::

    grain.MapDataset.source(source)       # records (or TokenizedGroups), random access
        [process_index::process_count]    # this process's shard of the records
        .seed(seed).shuffle()             # a different order each epoch
        .repeat(num_epochs)               # None = forever
        .map_with_index(BuildGroup(...))  # record → (index, TokenizedGroup | None, units)
        .to_iter_dataset(...)             # [.mp_prefetch(num_workers)]
    PackIterDataset(...)                  # first fit into [R, S] rows within a window

``PackIterDataset`` keeps a window of groups that did not fit the batch being filled; they are
tried first in the next batch, so no group waits more than one batch once it is the oldest. A
batch closes when its ``NG`` group slots are used, or when the window is full and none of its
groups fit the rows left. Only at the end of the data is a batch emitted with empty group slots
(``group_mask`` False) for lack of groups.

Iterator state (``get_state()``, JSON-serialisable) is the upstream grain state, the record
indices in the window (re-read by random access on restore) and the counters; restoring it
yields exactly the batches that would have followed. ``iterator.counters`` holds
``records_read``, ``records_skipped`` (the builder returned None), ``groups_dropped_too_long``
(longer than a row after truncation), ``groups_packed``, ``batches`` and ``epoch``, plus the
records builder's per-reason counts (``skipped/<reason>``, ``truncated/prompt``, ...) when it
reports them.

Process p of P reads only records ``p, p + P, …`` and produces its slice of the global batch:
``NG / P`` groups in ``R / P`` rows, flat node ids offset by ``p * (R / P) * N``. With a finite
``num_epochs`` the processes may run out of data a batch apart (their shards differ in length
and in skipped records); a multi-host trainer stops when any process is exhausted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
from absl import flags

from jaxpo.data.batcher import BatchBuilder, BatchConfig, check_shapes, fits_in_row
from jaxpo.data.layout import group_units
from jaxpo.data.types import TokenizedGroup

COUNTER_KEYS = ("records_read", "records_skipped", "groups_dropped_too_long", "groups_packed",
                "batches", "epoch")


@dataclasses.dataclass(frozen=True)
class BuildGroup:
    """``(index, record) → (index, group | None, units | None, counts)``: build and cut a group.

    Runs in grain's worker processes when ``num_workers > 0``, so it must pickle.

    Attributes:
      builder: ``record → TokenizedGroup | None`` (None: skipped record), or an object with a
        ``build(record)`` method returning a result with ``.group`` and ``.counts`` (the records
        module's ``GroupBuilder``, whose counts then reach the iterator's counters); None when
        the source already holds TokenizedGroups.
      cfg: the batch config (layout, K, M checks).
    """

    builder: Any
    cfg: BatchConfig

    def __call__(self, index: int, record: Any):
        counts = {}
        if self.builder is None:
            group = record
        elif hasattr(self.builder, "build"):
            result = self.builder.build(record)
            group, counts = result.group, dict(result.counts)
        else:
            group = self.builder(record)
        if group is None:
            return index, None, None, counts
        check_shapes(group, self.cfg)
        return index, group, group_units(group, self.cfg.layout), counts


class PackIterDataset(grain.IterDataset):
    """Packs ``(index, group, units)`` elements into fixed-shape batches (module docstring).

    Args:
      parent: the iter dataset of built groups.
      indexed: the map dataset ``parent`` iterates over, to re-read the window on restore.
      cfg: this process's batch shapes.
      window: how many groups may wait for a later batch.
      row_offset: global index of this process's first row.
      shard_len: records per epoch in this shard (for the ``epoch`` counter).
    """

    def __init__(self, parent: grain.IterDataset, indexed: grain.MapDataset, cfg: BatchConfig,
                 *, window: int, row_offset: int, shard_len: int):
        super().__init__(parent)
        if window < 1:
            raise ValueError(f"window: must be >= 1, got {window}")
        self._indexed, self._cfg, self._window = indexed, cfg, window
        self._row_offset, self._shard_len = row_offset, max(shard_len, 1)

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), self._indexed, self._cfg,
                            window=self._window, row_offset=self._row_offset,
                            shard_len=self._shard_len)

    def __str__(self) -> str:
        return f"PackIterDataset(layout={self._cfg.layout}, window={self._window})"


class PackIterator(grain.DatasetIterator):
    """The iterator of :class:`PackIterDataset`; ``counters`` are part of its state."""

    def __init__(self, parent: grain.DatasetIterator, indexed: grain.MapDataset,
                 cfg: BatchConfig, *, window: int, row_offset: int, shard_len: int):
        super().__init__(parent)
        self._indexed, self._cfg, self._window = indexed, cfg, window
        self._row_offset, self._shard_len = row_offset, shard_len
        self._pending: list[tuple[int, TokenizedGroup, list]] = []
        self._exhausted = False
        self.counters = dict.fromkeys(COUNTER_KEYS, 0)

    def __next__(self) -> dict:
        builder = BatchBuilder(self._cfg, self._row_offset)
        waiting = []
        for item in self._pending:  # the oldest groups first
            if not builder.add(item[1], item[2]):
                waiting.append(item)
        self._pending = waiting
        while not builder.full and len(self._pending) < self._window and not self._exhausted:
            try:
                index, group, units, counts = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            for key, n in counts.items():
                self.counters[key] = self.counters.get(key, 0) + n
            self.counters["records_read"] += 1
            self.counters["epoch"] = index // self._shard_len
            if group is None:
                self.counters["records_skipped"] += 1
            elif not fits_in_row(units, self._cfg):
                self.counters["groups_dropped_too_long"] += 1
            elif not builder.add(group, units):
                self._pending.append((index, group, units))
        if builder.num_groups == 0:
            raise StopIteration
        self.counters["groups_packed"] += builder.num_groups
        self.counters["batches"] += 1
        return builder.finish()

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "pending": [index for index, _, _ in self._pending],
            "exhausted": self._exhausted,
            "counters": dict(self.counters),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = [self._indexed[index][:3] for index in state["pending"]]
        self._exhausted = bool(state["exhausted"])
        self.counters = dict.fromkeys(COUNTER_KEYS, 0) | dict(state["counters"])


def make_train_iterator(
    source: Sequence[Any],
    builder: Callable[[Any], TokenizedGroup | None] | None = None,
    *,
    layout: str,
    batch_size: int,
    seq_len: int,
    max_responses: int,
    node_slots: int,
    max_steps: int = 1,
    rows: int | None = None,
    with_ref_logps: bool = False,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    window: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    read_threads: int = 0,
) -> PackIterator:
    """The training iterator: batches of this process's slice of the global batch.

    Args:
      source: random-access records (e.g. the records module's source), or TokenizedGroups when
        ``builder`` is None.
      builder: ``record → TokenizedGroup | None`` (None = skipped and counted), or a records
        ``GroupBuilder`` (its per-reason counts are added to ``counters``); must pickle when
        ``num_workers > 0``.
      layout: ``padded``, ``packed`` or ``share_prefix``.
      batch_size: ``NG`` group slots of the *global* batch (divisible by ``process_count``).
      seq_len: ``S``. max_responses: ``K``. node_slots: ``N``. max_steps: ``M``.
      rows: ``R`` rows of the global batch (default: :class:`BatchConfig`'s, times P).
      with_ref_logps: include the groups' precomputed ``ref_logps [NG, K]``.
      seed: shuffle seed; each epoch is shuffled differently.
      shuffle: shuffle the records (globally, within this process's shard).
      num_epochs: passes over the data; None repeats forever.
      window: groups that may wait for a later batch (default ``2 * NG / P``).
      process_index, process_count: this process and the number of processes.
      num_workers: grain worker processes for building groups (0 = in this process).
      read_threads: grain reader threads per process (0 = synchronous).

    Returns:
      An iterator of batch dicts (docs/architecture.md §2) with ``get_state()``/``set_state()``
      and a ``counters`` dict.
    """
    cfg = _local_config(layout, batch_size, seq_len, max_responses, node_slots, max_steps, rows,
                        with_ref_logps, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index: {process_index} not in [0, {process_count})")
    ds = grain.MapDataset.source(source)[process_index::process_count]
    shard_len = len(ds)
    if shuffle:
        ds = ds.seed(seed).shuffle()
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(BuildGroup(builder, cfg))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                 prefetch_buffer_size=max(read_threads, 1) * 8))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; use their defaults
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                               per_worker_buffer_size=16))
    packed = PackIterDataset(it_ds, ds, cfg, window=window or 2 * cfg.batch_size,
                             row_offset=process_index * cfg.num_rows, shard_len=shard_len)
    return packed.__iter__()


def make_eval_iterator(source: Sequence[Any],
                       builder: Callable[[Any], TokenizedGroup | None] | None = None,
                       **kwargs: Any) -> PackIterator:
    """One pass in order, no shuffle; the last batch is padded with empty groups.

    Takes the arguments of :func:`make_train_iterator` except ``shuffle``, ``num_epochs``
    and ``seed``.
    """
    return make_train_iterator(source, builder, shuffle=False, num_epochs=1, **kwargs)


def _local_config(layout, batch_size, seq_len, max_responses, node_slots, max_steps, rows,
                  with_ref_logps, process_count) -> BatchConfig:
    """This process's slice of the global batch shapes."""
    if process_count < 1 or batch_size % process_count:
        raise ValueError(f"batch_size: {batch_size} is not divisible by process_count="
                         f"{process_count}")
    if rows is not None and rows % process_count:
        raise ValueError(f"rows: {rows} is not divisible by process_count={process_count}")
    return BatchConfig(layout, batch_size=batch_size // process_count, seq_len=seq_len,
                       max_responses=max_responses, node_slots=node_slots, max_steps=max_steps,
                       rows=None if rows is None else rows // process_count,
                       with_ref_logps=with_ref_logps)
