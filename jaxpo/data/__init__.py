"""jaxpo.data: preference records → tokenised groups → fixed-shape batches.

Batching (docs/architecture.md §2): :meth:`BatchConfig.from_data_config` derives one process's
batch shapes from the run's :class:`jaxpo.config.DataConfig` (:func:`row_length` ``S``,
:func:`num_rows` ``R``, :func:`node_slots` ``N``); :func:`resolve_batch_shapes` fixes ``R`` and
``N`` for a run from a sample of its records (rows sized from a token budget);
:func:`pack_groups` packs a list of groups into one batch; :func:`make_train_iterator` /
:func:`make_eval_iterator` build the resumable grain pipeline.
"""

from jaxpo.data.batcher import BatchConfig, node_slots, num_rows, pack_groups, row_length
from jaxpo.data.pipeline import make_eval_iterator, make_train_iterator
from jaxpo.data.shapes import ShapePlan, plan_batch_shapes, resolve_batch_shapes
from jaxpo.data.types import TokenizedGroup

__all__ = [
    "BatchConfig",
    "ShapePlan",
    "TokenizedGroup",
    "make_eval_iterator",
    "make_train_iterator",
    "node_slots",
    "num_rows",
    "pack_groups",
    "plan_batch_shapes",
    "resolve_batch_shapes",
    "row_length",
]
