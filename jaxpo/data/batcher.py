"""Fixed-shape batch assembly: groups → rows (docs/architecture.md §2).

Dimensions: ``R`` rows, ``S`` row length, ``N`` node slots per row, ``NG`` group slots, ``K``
responses per group, ``M`` nodes on a response path.

A :class:`BatchBuilder` places one group at a time: ``padded`` gives group slot g the rows
``g*K … g*K+K-1`` (one response each); ``packed`` and ``share_prefix`` put the group's single
unit into the first row with room for its tokens and nodes (first fit). A group never straddles
rows. Within a row, groups take segments 1, 2, … in the order they were placed, and node slots
follow the row's preorder, so ``node_slot == node_pre`` for real tokens.

>>> import numpy as np
>>> from jaxpo.data.types import TokenizedGroup
>>> g = TokenizedGroup(id=7, kind="pair", node_tokens=[np.array([5, 6]), np.array([7]),
...                    np.array([8, 9])], node_parent=[-1, 0, 0], responses=[[1], [2]],
...                    scores=np.array([1.0, 0.0], np.float32))
>>> cfg = BatchConfig("share_prefix", batch_size=1, seq_len=6, max_responses=2, node_slots=4)
>>> b = pack_groups([g], cfg)
>>> b["tokens"].tolist(), b["pred_index"].tolist(), b["response_nodes"].tolist()
([[5, 6, 7, 8, 9, 0]], [[-1, -1, 1, 1, 3, -1]], [[[1], [2]]])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxpo.config import LAYOUTS, DataConfig
from jaxpo.data.layout import Unit, check_group, group_units
from jaxpo.data.types import TokenizedGroup

TOKEN_KEYS = ("tokens", "positions", "segment", "node_pre", "node_last", "pred_index", "node_slot")


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Static batch shapes (of one process's slice of the global batch).

    Attributes:
      layout: ``padded``, ``packed`` or ``share_prefix``.
      batch_size: ``NG``, group slots per batch.
      seq_len: ``S``, tokens per row.
      max_responses: ``K``, responses per group.
      node_slots: ``N``, node slots per row.
      max_steps: ``M``, nodes on a response path (1 for pairs, lists, unpaired).
      rows: ``R``. ``padded`` needs ``NG * K`` (the default). For ``packed``/``share_prefix`` the
        default is ``NG`` (``G = NG / R = 1`` group per row on average); fewer rows pack tighter,
        and a batch closes early, with fewer than ``NG`` groups, when the rows are full
        (:func:`num_rows` derives ``R`` from a token budget).
      with_ref_logps: include ``ref_logps [NG, K]`` (every group must carry them).
    """

    layout: str
    batch_size: int
    seq_len: int
    max_responses: int
    node_slots: int
    max_steps: int = 1
    rows: int | None = None
    with_ref_logps: bool = False

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: must be one of {LAYOUTS}, got {self.layout!r}")
        for name in ("batch_size", "seq_len", "max_responses", "node_slots", "max_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.node_slots < 1 + self.max_steps:
            raise ValueError(f"node_slots: {self.node_slots} < 1 + max_steps = "
                             f"{1 + self.max_steps}; a response and its prompt need that many")
        if self.rows is not None:
            if self.rows < 1:
                raise ValueError(f"rows: must be >= 1, got {self.rows}")
            if self.layout == "padded" and self.rows != self.batch_size * self.max_responses:
                raise ValueError(f"rows: padded layout needs batch_size * max_responses = "
                                 f"{self.batch_size * self.max_responses} rows, got {self.rows}")

    @classmethod
    def from_data_config(cls, data_cfg: DataConfig, *, process_count: int = 1,
                         with_ref_logps: bool = False) -> BatchConfig:
        """One process's slice of the global batch that ``data_cfg`` describes.

        ``NG = data.batch_size / P`` group slots, ``R = num_rows(data, P) / P`` rows
        (:func:`num_rows`), ``S`` = :func:`row_length`, ``N`` = :func:`node_slots`,
        ``K = data.max_responses``, ``M = data.max_steps``.

        Args:
          data_cfg: the run's data config (global batch shapes).
          process_count: ``P``, the processes that each feed a slice of the global batch.
          with_ref_logps: include the groups' precomputed ``ref_logps [NG, K]``.

        >>> cfg = BatchConfig.from_data_config(DataConfig(max_length=64, batch_size=8),
        ...                                    process_count=2)
        >>> cfg.layout, cfg.batch_size, cfg.seq_len, cfg.node_slots, cfg.num_rows
        ('share_prefix', 4, 127, 6, 4)
        """
        if process_count < 1 or data_cfg.batch_size % process_count:
            raise ValueError(f"data.batch_size={data_cfg.batch_size} is not divisible by "
                             f"process_count={process_count}")
        rows = num_rows(data_cfg, process_count=process_count)
        return cls(data_cfg.layout, batch_size=data_cfg.batch_size // process_count,
                   seq_len=row_length(data_cfg), max_responses=data_cfg.max_responses,
                   node_slots=node_slots(data_cfg), max_steps=data_cfg.max_steps,
                   rows=rows // process_count, with_ref_logps=with_ref_logps)

    @property
    def num_rows(self) -> int:
        if self.rows is not None:
            return self.rows
        return self.batch_size * (self.max_responses if self.layout == "padded" else 1)


def row_length(data_cfg: DataConfig) -> int:
    """``S``: ``data.seq_len``, or the longest group that survives the length limits.

    ``data.max_length`` bounds prompt + response, per response (the group builder cuts each
    response to it), so a group of K responses under a prompt of ``p >= 1`` tokens has at most
    ``p + K * (max_length - p)`` distinct tokens: ``K * (max_length - 1) + 1`` in the
    ``share_prefix`` layout (prompt and shared steps once), ``K * max_length`` in ``packed``
    (prompt repeated per response), ``max_length`` in ``padded`` (a row per response). A
    shorter ``data.seq_len`` drops every group longer than it (``groups_dropped_too_long``).

    >>> row_length(DataConfig(layout="packed", max_length=64, max_responses=4))
    256
    """
    d = data_cfg
    if d.seq_len:
        return d.seq_len
    if d.layout == "padded":
        return d.max_length
    if d.layout == "packed":
        return d.max_responses * d.max_length
    return d.max_responses * (d.max_length - 1) + 1


def group_node_slots(data_cfg: DataConfig) -> int:
    """The most node slots one group can take in a row of ``data.layout``.

    A response is a path of at most ``M = data.max_steps`` nodes under the prompt: ``1 + M``
    nodes per row in ``padded``, ``K * (1 + M)`` per group in ``packed`` (the prompt repeated
    per response), at most ``1 + K * M`` per group in ``share_prefix``.

    >>> group_node_slots(DataConfig(layout="share_prefix", max_responses=4, max_steps=3))
    13
    """
    d = data_cfg
    k, m = d.max_responses, d.max_steps
    if d.layout == "padded":
        return 1 + m
    return k * (1 + m) if d.layout == "packed" else 1 + k * m


def num_rows(data_cfg: DataConfig, *, process_count: int = 1) -> int:
    """``R``, rows of the global batch.

    ``padded``: ``batch_size * K``. ``packed``/``share_prefix``: ``data.rows`` when set; else,
    when ``data.tokens_per_batch`` is set, ``ceil(tokens_per_batch / S)`` rounded up to a
    multiple of ``process_count`` (each process packs ``R / P`` rows) and at most
    ``batch_size`` (one group per row always fits); else ``batch_size``.

    >>> cfg = DataConfig(max_length=256, batch_size=8, tokens_per_batch=1200)  # S = 511
    >>> num_rows(cfg), num_rows(cfg, process_count=2)
    (3, 4)
    """
    d = data_cfg
    if d.rows % process_count:
        raise ValueError(f"data.rows={d.rows} is not divisible by process_count={process_count}")
    if d.rows:
        return d.rows
    if d.layout == "padded":
        return d.batch_size * d.max_responses
    if not d.tokens_per_batch:
        return d.batch_size
    rows = -(-d.tokens_per_batch // row_length(d))  # ceil
    rows = -(-rows // process_count) * process_count
    return min(rows, -(-d.batch_size // process_count) * process_count)


def node_slots(data_cfg: DataConfig) -> int:
    """``N``: ``data.node_slots``, or room for twice the average groups per row, each counted at
    the largest group's node count (:func:`group_node_slots`).

    With ``R0 = data.rows``, else ``min(ceil(data.tokens_per_batch / S), batch_size)``, else
    ``batch_size`` (:func:`num_rows` before its rounding to the process count, so ``N`` needs
    only the config):
    ``N = group_node_slots * ceil(2 * batch_size / R0)``; with one group per row on average
    (``R0 = batch_size``), room for two of the largest groups. ``R * N`` is then at least twice
    the node slots of ``batch_size`` of the largest groups, so rows fill up on tokens, not on
    node slots. Node slots are cheap (a segment sum over ``R * N``); tokens are what costs.

    >>> node_slots(DataConfig(layout="share_prefix", max_responses=4, max_steps=3))
    26
    >>> node_slots(DataConfig(max_length=256, batch_size=8, rows=2))  # 3 nodes per pair
    24
    """
    d = data_cfg
    if d.node_slots:
        return d.node_slots
    per_group = group_node_slots(d)
    if d.layout == "padded":
        return per_group
    rows = d.rows or (min(-(-d.tokens_per_batch // row_length(d)), d.batch_size)
                      if d.tokens_per_batch else d.batch_size)
    return per_group * max(1, -(-2 * d.batch_size // rows))


def check_shapes(group: TokenizedGroup, cfg: BatchConfig) -> None:
    """Raises ``ValueError`` if the group has more responses or steps than the config allows."""
    check_group(group)
    if group.num_responses > cfg.max_responses:
        raise ValueError(f"group {group.id}: {group.num_responses} responses > max_responses="
                         f"{cfg.max_responses}")
    steps = max(len(path) for path in group.responses)
    if steps > cfg.max_steps:
        raise ValueError(f"group {group.id}: a response has {steps} steps > max_steps="
                         f"{cfg.max_steps}")
    if cfg.with_ref_logps and group.ref_logps is None:
        raise ValueError(f"group {group.id}: with_ref_logps=True but the group has no ref_logps")


def fits_in_row(units: Sequence[Unit], cfg: BatchConfig) -> bool:
    """Whether each unit fits an empty row (else the group is dropped as too long)."""
    return all(u.num_tokens <= cfg.seq_len and u.num_nodes <= cfg.node_slots for u in units)


class BatchBuilder:
    """Fills one batch, a group at a time.

    Args:
      cfg: the batch shapes.
      row_offset: global index of this batch's first row; flat node ids are
        ``(row_offset + row) * N + slot`` (process p of P passes ``p * R``).
    """

    def __init__(self, cfg: BatchConfig, row_offset: int = 0):
        self.cfg = cfg
        self.row_offset = row_offset
        R, S = cfg.num_rows, cfg.seq_len
        NG, K, M = cfg.batch_size, cfg.max_responses, cfg.max_steps
        self.arrays = {key: np.zeros((R, S), np.int32) for key in TOKEN_KEYS}  # [R, S]
        self.arrays["pred_index"][:] = -1
        self.arrays["response_nodes"] = np.full((NG, K, M), -1, np.int32)
        self.arrays["scores"] = np.zeros((NG, K), np.float32)
        self.arrays["response_mask"] = np.zeros((NG, K), bool)
        self.arrays["group_mask"] = np.zeros(NG, bool)
        self.arrays["group_id"] = np.full(NG, -1, np.int32)
        self.arrays["margin"] = np.zeros(NG, np.float32)  # a pair's reward-model margin
        if cfg.with_ref_logps:
            self.arrays["ref_logps"] = np.zeros((NG, K), np.float32)
        self.row_tokens = np.zeros(R, np.int64)  # [R] tokens used
        self.row_nodes = np.zeros(R, np.int64)  # [R] node slots used
        self.row_groups = np.zeros(R, np.int64)  # [R] segments used
        self.num_groups = 0
        self.groups: list[TokenizedGroup] = []  # placed, in group-slot order

    @property
    def full(self) -> bool:
        return self.num_groups == self.cfg.batch_size

    def add(self, group: TokenizedGroup, units: Sequence[Unit]) -> bool:
        """Places the group (cut into ``units`` by its layout); False if there is no room."""
        if self.full:
            return False
        g = self.num_groups
        if self.cfg.layout == "padded":
            rows = [g * self.cfg.max_responses + k for k, _ in (u.responses[0] for u in units)]
        else:
            (unit,) = units
            room = ((self.row_tokens + unit.num_tokens <= self.cfg.seq_len)
                    & (self.row_nodes + unit.num_nodes <= self.cfg.node_slots))  # [R]
            if not room.any():
                return False
            rows = [int(np.argmax(room))]
        for row, unit in zip(rows, units):
            self._write(g, row, unit)
        K = group.num_responses
        self.arrays["scores"][g, :K] = group.scores
        self.arrays["response_mask"][g, :K] = True
        self.arrays["group_mask"][g] = True
        self.arrays["group_id"][g] = group.id
        self.arrays["margin"][g] = group.margin
        if self.cfg.with_ref_logps:
            self.arrays["ref_logps"][g, :K] = group.ref_logps
        self.num_groups += 1
        self.groups.append(group)
        return True

    def _write(self, g: int, row: int, unit: Unit) -> None:
        t0, n0 = int(self.row_tokens[row]), int(self.row_nodes[row])
        span = slice(t0, t0 + unit.num_tokens)
        a = self.arrays
        node = n0 + unit.local_node  # [L]
        a["tokens"][row, span] = unit.tokens
        a["positions"][row, span] = unit.positions
        a["segment"][row, span] = self.row_groups[row] + 1
        a["node_pre"][row, span] = node
        a["node_slot"][row, span] = node
        a["node_last"][row, span] = n0 + unit.node_last[unit.local_node]
        a["pred_index"][row, span] = np.where(unit.local_pred >= 0, t0 + unit.local_pred, -1)
        flat = (self.row_offset + row) * self.cfg.node_slots + n0
        for k, path in unit.responses:
            a["response_nodes"][g, k, : len(path)] = flat + np.asarray(path)
        self.row_tokens[row] += unit.num_tokens
        self.row_nodes[row] += unit.num_nodes
        self.row_groups[row] += 1

    def finish(self) -> dict[str, np.ndarray]:
        """The batch dict (docs/architecture.md §2); empty group slots are masked out."""
        return self.arrays


def pack_groups(groups: Sequence[TokenizedGroup], cfg: BatchConfig, *,
                row_offset: int = 0) -> dict[str, np.ndarray]:
    """Packs ``groups`` (in order, first fit) into one batch.

    Args:
      groups: at most ``cfg.batch_size`` groups.
      cfg: the batch shapes.
      row_offset: global index of the first row, for the flat ids in ``response_nodes``.

    Returns:
      The batch dict of docs/architecture.md §2.

    Raises:
      ValueError: a group is malformed, exceeds K or M, or does not fit the batch.
    """
    if len(groups) > cfg.batch_size:
        raise ValueError(f"{len(groups)} groups > batch_size={cfg.batch_size}")
    builder = BatchBuilder(cfg, row_offset)
    for group in groups:
        check_shapes(group, cfg)
        units = group_units(group, cfg.layout)
        if not fits_in_row(units, cfg):
            raise ValueError(f"group {group.id}: longer than a row (seq_len={cfg.seq_len}, "
                             f"node_slots={cfg.node_slots}) in layout {cfg.layout!r}")
        if not builder.add(group, units):
            raise ValueError(f"group {group.id}: no room left in the {cfg.num_rows} rows")
    return builder.finish()
