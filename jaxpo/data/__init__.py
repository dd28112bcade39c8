"""jaxpo.data: preference records → tokenised groups → fixed-shape batches.

Batching (docs/architecture.md §2): :func:`pack_groups` packs a list of groups into one batch;
:func:`make_train_iterator` / :func:`make_eval_iterator` build the resumable grain pipeline.
"""

from jaxpo.data.batcher import BatchConfig, pack_groups
from jaxpo.data.layout import LAYOUTS
from jaxpo.data.pipeline import make_eval_iterator, make_train_iterator
from jaxpo.data.types import TokenizedGroup

__all__ = [
    "LAYOUTS",
    "BatchConfig",
    "TokenizedGroup",
    "make_eval_iterator",
    "make_train_iterator",
    "pack_groups",
]
