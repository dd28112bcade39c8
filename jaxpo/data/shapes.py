"""Batch shapes from the data: rows sized from a token budget (docs/data.md, "Batch shapes").

A packed or prefix-shared batch is ``R`` rows of ``S`` tokens with ``N`` node slots per row, the
same for the whole run (static shapes, one compilation). ``S`` (:func:`~jaxpo.data.row_length`)
holds the longest group the length limits allow, so with one row per group (``R = NG``, the
config-only default) most of a batch is padding when groups are short. The rows a batch really
needs depend on the data, so :func:`resolve_batch_shapes` measures them once per run:

1. build the groups of a fixed sample of the records (``sample_size`` records evenly spread
   over the source, the first and the last included), as the pipeline would, and cut them
   into units of the layout: ``(tokens, node slots)`` per group;
2. pack that sample, shuffled with a fixed seed and repeated until it makes at least
   ``MIN_BATCHES`` batches, exactly as the train iterator packs (first fit, oldest waiting
   groups first, a window of ``2 * NG`` groups), for ``R = m, 2m, ...`` rows
   (``m = lcm(process_count, row_multiple)``), starting from the least that could hold the
   mean group, and keep the first ``R`` with which at least ``FULL_TARGET`` of the batches
   carry all their ``NG`` groups (at most ``NG`` rounded up to ``m``: one group per row);
3. ``tokens_per_batch = R * S``; ``N`` = :func:`~jaxpo.data.node_slots` of that ``R``, as for
   an explicit ``data.rows = R``.

Explicit ``data.rows``, ``data.tokens_per_batch`` and ``data.node_slots`` win, in that order for
``R``. The result depends only on the config and the sampled records, so every process of a
multi-host run (each reads the whole source here) and every restart computes the same shapes.

>>> import numpy as np
>>> from jaxpo.data.types import TokenizedGroup
>>> def pair(i):  # a prompt of 60 tokens, two responses of 30 (S = 511 at max_length=256)
...     return TokenizedGroup(i, "pair", [np.ones(60, np.int32), np.ones(30, np.int32),
...                           np.ones(30, np.int32)], [-1, 0, 0], [[1], [2]],
...                           np.array([1.0, 0.0], np.float32))
>>> cfg = DataConfig(max_length=256, batch_size=8)
>>> shapes = resolve_batch_shapes(cfg, [pair(i) for i in range(40)], None)
>>> shapes.rows, shapes.node_slots, shapes.tokens_per_batch
(2, 24, 1022)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxpo.config import DataConfig
from jaxpo.data.batcher import BatchConfig, node_slots, num_rows, row_length
from jaxpo.data.errors import BadRecordError
from jaxpo.data.pipeline import BuildGroup

SAMPLE_SIZE = 256  # records built to measure the groups
MIN_BATCHES = 64  # simulated batches per candidate R (the sample is repeated, reshuffled)
FULL_TARGET = 0.95  # fraction of batches that must carry all NG groups


@dataclasses.dataclass(frozen=True)
class ShapePlan:
    """The resolved batch shapes and what they were measured on.

    Attributes:
      config: the data config with ``rows``, ``node_slots`` and ``tokens_per_batch`` filled in.
      records: records built from the source.
      groups: usable groups among them (not skipped, dropped, or longer than a row).
      mean_group_tokens: mean tokens of a group's unit(s) in the layout (0 without groups).
      full_fraction: simulated fraction of batches that carry all ``batch_size`` groups with
        these shapes (1 for ``padded``; NaN without groups).
      groups_per_batch: simulated mean real groups per batch (NaN without groups).
    """

    config: DataConfig
    records: int
    groups: int
    mean_group_tokens: float
    full_fraction: float
    groups_per_batch: float


def resolve_batch_shapes(data_cfg: DataConfig, source: Sequence[Any], builder: Any, *,
                         process_count: int = 1, row_multiple: int = 1,
                         sample_size: int = SAMPLE_SIZE) -> DataConfig:
    """``data_cfg`` with ``rows``, ``node_slots`` and ``tokens_per_batch`` fixed for the run.

    Call it once per run, on the training records, and use the returned config for every
    iterator (train and eval) and for the step's ``N`` (:func:`~jaxpo.data.node_slots`).

    Args:
      data_cfg: the run's data config; its explicit ``rows`` / ``tokens_per_batch`` /
        ``node_slots`` win over the derived ones.
      source: the training records (all of them, on every process), as given to
        :func:`~jaxpo.data.make_train_iterator`; or TokenizedGroups when ``builder`` is None.
      builder: the group builder given to the iterator (its counters are not touched).
      process_count: ``P``; ``R`` is a multiple of it.
      row_multiple: ``R`` is also a multiple of this (e.g. the mesh's batch-axis size).
      sample_size: records to measure.

    Returns:
      A copy of ``data_cfg`` (see :func:`plan_batch_shapes` for the measurements).
    """
    return plan_batch_shapes(data_cfg, source, builder, process_count=process_count,
                             row_multiple=row_multiple, sample_size=sample_size).config


def plan_batch_shapes(data_cfg: DataConfig, source: Sequence[Any], builder: Any, *,
                      process_count: int = 1, row_multiple: int = 1,
                      sample_size: int = SAMPLE_SIZE) -> ShapePlan:
    """:func:`resolve_batch_shapes`, with the sample's measurements (for logs and benchmarks)."""
    d = data_cfg
    if process_count < 1 or row_multiple < 1:
        raise ValueError(f"process_count={process_count} and row_multiple={row_multiple} must "
                         "be >= 1")
    if d.batch_size % process_count:
        raise ValueError(f"data.batch_size={d.batch_size} is not divisible by "
                         f"process_count={process_count}")
    S, P = row_length(d), process_count
    m = math.lcm(P, row_multiple)
    cap = -(-d.batch_size // m) * m  # one group per row: every group fits
    sizes, records = sample_sizes(d, source, builder, sample_size)
    mean = float(np.mean([t for t, _ in sizes])) if sizes else 0.0

    def done(rows: int, full: float = math.nan, per_batch: float = math.nan) -> ShapePlan:
        # N as the config alone gives it when it says R (rows or a budget), else for this R.
        slots = node_slots(d if d.rows or d.tokens_per_batch else dataclasses.replace(d, rows=rows))
        cfg = dataclasses.replace(d, rows=rows, tokens_per_batch=rows * S, node_slots=slots)
        if sizes and d.layout != "padded" and math.isnan(full):
            full, per_batch = _simulate(sizes, cfg, P)
        return ShapePlan(cfg, records, len(sizes), mean, full, per_batch)

    if d.layout == "padded":
        return done(num_rows(d, process_count=P), 1.0, float(d.batch_size))
    if d.rows:
        return done(num_rows(d, process_count=P))
    if d.tokens_per_batch:
        return done(min(-(-num_rows(d, process_count=P) // m) * m, cap))
    if not sizes:  # nothing usable: the iterator will say why
        return done(cap)
    rows = max(m, -(-math.ceil(d.batch_size * mean / S) // m) * m)
    while rows < cap:
        full, per_batch = _simulate(sizes, done(rows, 0.0, 0.0).config, P)
        if full >= FULL_TARGET:
            return done(rows, full, per_batch)
        rows += m
    return done(cap)


def sample_sizes(data_cfg: DataConfig, source: Sequence[Any], builder: Any,
                 sample_size: int = SAMPLE_SIZE) -> tuple[list[tuple[int, int]], int]:
    """``([(tokens, node slots)] per usable sampled group, records built)``.

    The records are ``sample_size`` indices evenly spread over ``source`` (all of them when it
    is smaller), built and cut as the pipeline does; groups longer than a row (tokens, or
    explicit ``data.node_slots``) are left out, as the pipeline drops them, and so are bad
    records under ``on_bad_record="error"`` (the iterator raises when the run reaches one).
    """
    n = len(source)
    if n == 0 or sample_size < 1:
        return [], 0
    index = np.unique(np.linspace(0, n - 1, min(n, sample_size)).round().astype(np.int64))
    cfg = BatchConfig.from_data_config(dataclasses.replace(data_cfg, rows=0))
    build = BuildGroup(builder, cfg)
    sizes = []
    for i in index.tolist():
        try:
            _, group, units, _ = build(i, source[i])
        except BadRecordError:  # the pipeline reports it if the run reaches it
            continue
        if group is None:
            continue
        tokens = [u.num_tokens for u in units]
        nodes = [u.num_nodes for u in units]
        if max(tokens) > cfg.seq_len or (data_cfg.node_slots and max(nodes) > cfg.node_slots):
            continue
        sizes.append((sum(tokens), sum(nodes)))
    return sizes, len(index)


def _simulate(sizes: list[tuple[int, int]], cfg: DataConfig, process_count: int
              ) -> tuple[float, float]:
    """``(fraction of full batches, mean groups per batch)`` of one process packing the
    sample with ``cfg``'s shapes, as :class:`~jaxpo.data.pipeline.PackIterator` does."""
    batch = BatchConfig.from_data_config(cfg, process_count=process_count)
    ng = batch.batch_size
    passes = max(1, -(-MIN_BATCHES * ng // len(sizes)))
    rng = np.random.default_rng(0)
    stream = iter([sizes[i] for _ in range(passes) for i in rng.permutation(len(sizes))])
    counts = simulate_packing(stream, ng, batch.num_rows, batch.seq_len, batch.node_slots,
                              window=2 * ng)
    return float(np.mean([c == ng for c in counts])), float(np.mean(counts))


def simulate_packing(stream, batch_size: int, rows: int, seq_len: int, node_slots: int, *,
                     window: int) -> list[int]:
    """Groups per batch when ``(tokens, nodes)`` units from ``stream`` are packed first fit.

    The batches that close while the stream still has groups, i.e. not the ones left short by
    the end of the data. Mirrors :class:`~jaxpo.data.pipeline.PackIterator`.

    >>> simulate_packing(iter([(6, 2)] * 12), 4, 2, 10, 4, window=2)  # 2 rows: 2 groups fit
    [2, 2, 2, 2, 2]
    >>> simulate_packing(iter([(6, 2), (4, 1), (3, 1)] * 5), 4, 2, 10, 4, window=8)
    [4, 4, 4]
    """
    limit = np.array([seq_len, node_slots])
    pending: list[tuple[int, int]] = []
    out, exhausted = [], False
    while True:
        used = np.zeros((rows, 2), np.int64)  # [R, 2] tokens and node slots used per row
        placed = 0

        def add(unit, used=used):
            nonlocal placed
            if placed == batch_size:
                return False
            room = np.all(used + unit <= limit, axis=1)  # [R]
            if not room.any():
                return False
            used[int(np.argmax(room))] += unit
            placed += 1
            return True

        pending = [u for u in pending if not add(u)]
        while placed < batch_size and len(pending) < window and not exhausted:
            unit = next(stream, None)
            if unit is None:
                exhausted = True
            elif not add(unit):
                pending.append(unit)
        if exhausted or placed == 0:
            return out
        out.append(placed)
