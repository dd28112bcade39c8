"""The grain pipeline: records → tokenised groups → fixed-shape batches, resumable.

The chain reads top to bottom::

    grain.MapDataset.source(source)       # records (or TokenizedGroups), random access
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

A pass over the records that yields no group at all (every record skipped, dropped by the length
limits or longer than a row) would make the iterator read forever: once a whole epoch has been
read with nothing usable, ``next()`` raises ``ValueError("no usable records in FILES: N read, N
skipped (reasons with counts)")``.

The iterator yields the *global* batch, and the same one on every process of a multi-host
run: the sequence of batches is a function of the records, the seed and the global batch shapes
only, never of the number of processes or of the device order, so a run can move between
topologies and resume where it stopped. Each process then uploads only the rows its devices
hold (:func:`jaxpo.sharding.make_global_batch`, which reads the rows off the batch sharding's
addressable indices), so flat node ids are global ids by construction. The price is that every
host reads and tokenises every record of a batch; a batch of 128 pairs of 4k tokens is about
half a million tokens, well under a second of the tokenizer next to a multi-second step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
from absl import flags

from jaxpo.config import DataConfig
from jaxpo.data.batcher import BatchBuilder, BatchConfig, check_shapes, fits_in_row
from jaxpo.data.layout import group_units
from jaxpo.data.mismatched import mismatched_pairs
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
      cfg: the global batch shapes.
      window: how many groups may wait for a later batch.
      num_records: records per epoch (for the ``epoch`` counter).
      name: the source, for messages (its files).
      mismatched_max_length: when > 0, each batch also holds its mismatched prompt/completion
        pairs (``kl_*`` arrays, :mod:`jaxpo.data.mismatched`) cut to this length.
    """

    def __init__(self, parent: grain.IterDataset, indexed: grain.MapDataset, cfg: BatchConfig,
                 *, window: int, num_records: int, name: str = "the records",
                 mismatched_max_length: int = 0):
        super().__init__(parent)
        if window < 1:
            raise ValueError(f"window: must be >= 1, got {window}")
        self._indexed, self._cfg, self._window = indexed, cfg, window
        self._num_records, self._name = max(num_records, 1), name
        self._mismatched = mismatched_max_length

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), self._indexed, self._cfg,
                            window=self._window, num_records=self._num_records,
                            name=self._name,
                            mismatched_max_length=self._mismatched)

    def __str__(self) -> str:
        return f"PackIterDataset(layout={self._cfg.layout}, window={self._window})"


class PackIterator(grain.DatasetIterator):
    """The iterator of :class:`PackIterDataset`; ``counters`` are part of its state."""

    def __init__(self, parent: grain.DatasetIterator, indexed: grain.MapDataset,
                 cfg: BatchConfig, *, window: int, num_records: int,
                 name: str = "the records", mismatched_max_length: int = 0):
        super().__init__(parent)
        self._indexed, self._cfg, self._window = indexed, cfg, window
        self._mismatched = mismatched_max_length
        self._num_records, self._name = num_records, name
        self._pending: list[tuple[int, TokenizedGroup, list]] = []
        self._exhausted = False
        self.counters = dict.fromkeys(COUNTER_KEYS, 0)

    def __next__(self) -> dict:
        builder = BatchBuilder(self._cfg)
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
            self.counters["epoch"] = index // self._num_records
            if group is None:
                self.counters["records_skipped"] += 1
            elif not fits_in_row(units, self._cfg):
                self.counters["groups_dropped_too_long"] += 1
            elif not builder.add(group, units):
                self._pending.append((index, group, units))
            if self.counters["records_read"] >= self._num_records and self._usable() == 0:
                raise self._no_usable_records()
        if builder.num_groups == 0:
            raise StopIteration
        self.counters["groups_packed"] += builder.num_groups
        self.counters["batches"] += 1
        batch = builder.finish()
        if self._mismatched:  # KTO's reference point (jaxpo.data.mismatched)
            batch |= mismatched_pairs(builder.groups, self._cfg, 0, self._mismatched)
        return batch

    def _usable(self) -> int:
        """Records read so far that became a group of a batch (packed, pending or placed)."""
        c = self.counters
        return c["records_read"] - c["records_skipped"] - c["groups_dropped_too_long"]

    def _no_usable_records(self) -> ValueError:
        """A whole pass yielded no group: training would wait for one forever."""
        c = self.counters
        counted = {k: v for k, v in sorted(c.items()) if k.startswith(("skipped/", "dropped/"))}
        reasons = [f"{k}: {v}" for k, v in counted.items() if v]
        unexplained = c["records_skipped"] - sum(counted.values())
        if unexplained > 0:  # a builder that does not report its reasons
            reasons.append(f"builder returned None: {unexplained}")
        too_long = c["groups_dropped_too_long"]
        if too_long:
            reasons.append(f"longer than a row (seq_len={self._cfg.seq_len}, node_slots="
                           f"{self._cfg.node_slots}): {too_long}")
        return ValueError(
            f"no usable records in {self._name}: {c['records_read']} read, "
            f"{c['records_skipped'] + too_long} skipped ({', '.join(reasons)})")

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
    builder: Callable[[Any], TokenizedGroup | None] | None,
    data_cfg: DataConfig,
    *,
    seed: int = 0,
    num_epochs: int | None = None,
    with_ref_logps: bool = False,
    mismatched_pairs: bool = False,
) -> PackIterator:
    """The training iterator: global batches, the same on every process (module docstring).

    Args:
      source: random-access records (a :class:`~jaxpo.data.sources.RecordSource`), or
        TokenizedGroups when ``builder`` is None.
      builder: ``record → TokenizedGroup | None`` (None = skipped and counted), or a
        ``GroupBuilder`` (its per-reason counts are added to ``counters``); must pickle when
        ``data_cfg.num_workers > 0``.
      data_cfg: the global batch shapes (:meth:`BatchConfig.from_data_config`), ``shuffle``
        and ``num_workers``.
      seed: shuffle seed; each epoch is shuffled differently.
      num_epochs: passes over the data; None repeats forever.
      with_ref_logps: include the groups' precomputed ``ref_logps [NG, K]``.
      mismatched_pairs: include each batch's mismatched prompt/completion pairs (``kl_*``
        arrays, :mod:`jaxpo.data.mismatched`: KTO's reference point).

    Returns:
      An iterator of batch dicts (docs/architecture.md §2) with ``get_state()``/``set_state()``
      and a ``counters`` dict.

    Raises:
      ValueError: from ``next()``, when a whole pass over this process's records yields no
        group to train on (every record skipped, dropped or too long for a row): the message
        counts the records read and the reasons.
    """
    return _iterator(source, builder, data_cfg, shuffle=data_cfg.shuffle, seed=seed,
                     num_epochs=num_epochs, with_ref_logps=with_ref_logps,
                     mismatched_pairs=mismatched_pairs)


def make_eval_iterator(
    source: Sequence[Any],
    builder: Callable[[Any], TokenizedGroup | None] | None,
    data_cfg: DataConfig,
    *,
    with_ref_logps: bool = False,
    mismatched_pairs: bool = False,
) -> PackIterator:
    """One pass in order (``data_cfg.shuffle`` is ignored); the last batch is padded with
    empty groups. Arguments as for :func:`make_train_iterator`."""
    return _iterator(source, builder, data_cfg, shuffle=False, seed=0, num_epochs=1,
                     with_ref_logps=with_ref_logps, mismatched_pairs=mismatched_pairs)


def _iterator(source, builder, data_cfg: DataConfig, *, shuffle: bool, seed: int,
              num_epochs: int | None, with_ref_logps: bool, mismatched_pairs: bool = False
              ) -> PackIterator:
    cfg = BatchConfig.from_data_config(data_cfg, with_ref_logps=with_ref_logps)
    name = _describe(source)
    ds = grain.MapDataset.source(source)
    num_records = len(ds)
    if num_records == 0:
        raise ValueError(f"no records in {name}")
    if shuffle:
        ds = ds.seed(seed).shuffle()
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(BuildGroup(builder, cfg))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=8))
    if data_cfg.num_workers > 0:
        # grain (0.2.18, grain/_src/core/profiler.py) reads its absl flag
        # --grain_enable_multiprocess_worker_profiling when it starts workers, which raises
        # UnparsedFlagAccessError outside an absl app; there every flag keeps its default.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_cfg.num_workers, per_worker_buffer_size=16))
    packed = PackIterDataset(it_ds, ds, cfg, window=2 * cfg.batch_size, num_records=num_records,
                             name=name, mismatched_max_length=(
                                 data_cfg.max_length if mismatched_pairs else 0))
    return packed.__iter__()


def _describe(source: Sequence[Any]) -> str:
    """The source's files for messages (``a.jsonl, b.jsonl``), else ``the records given``."""
    files = [str(f) for f in getattr(source, "files", None) or []]
    if len(files) > 3:
        return f"{', '.join(files[:2])}, ... ({len(files)} files)"
    return ", ".join(files) or "the records given"
