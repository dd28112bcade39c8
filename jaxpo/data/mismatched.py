"""Mismatched prompt/completion pairs for KTO's reference point, built beside each batch.

KTO (Ethayarajh et al. 2024) estimates its reference point z0 = KL(π_θ ‖ π_ref) from
completions that do not answer their prompt: as TRL does, example ``i`` of a batch is paired
with the completion of example ``i − 1`` (the first with the last). The pairs are packed with
the batch's own shapes into arrays named like the batch's with a ``kl_`` prefix::

    {"tokens": [R, S], ..., "response_nodes": [NG, K, M], "group_mask": [NG]}
    → {"kl_tokens": [R, S], ..., "kl_response_nodes": [NG, K, M], "kl_group_mask": [NG]}

A pair longer than ``max_length`` keeps its prompt and is cut at the end of the completion; a
pair that does not fit the rows is left out of the estimate (its ``kl_group_mask`` is False).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxpo.data.batcher import BatchBuilder, BatchConfig, fits_in_row
from jaxpo.data.layout import group_units
from jaxpo.data.types import TokenizedGroup

# The batch entries the pairs fill (the log-prob inputs and the masks), and their names.
KEYS = ("tokens", "positions", "segment", "node_pre", "node_last", "pred_index", "node_slot",
        "response_nodes", "response_mask", "group_mask")
KL_KEYS = tuple(f"kl_{k}" for k in KEYS)


def mismatched_group(prompt_of: TokenizedGroup, completion_of: TokenizedGroup,
                     max_length: int) -> TokenizedGroup | None:
    """``prompt_of``'s prompt with the first response of ``completion_of`` (None if no room).

    >>> a = TokenizedGroup(0, "unpaired", [np.array([1, 2]), np.array([3])], [-1, 0], [[1]],
    ...                    np.ones(1, np.float32))
    >>> b = TokenizedGroup(1, "unpaired", [np.array([4]), np.array([5, 6])], [-1, 0], [[1]],
    ...                    np.ones(1, np.float32))
    >>> [t.tolist() for t in mismatched_group(a, b, max_length=3).node_tokens]
    [[1, 2], [5]]
    """
    prompt = np.asarray(prompt_of.node_tokens[0])
    completion = completion_of.response_tokens(0)[:max(max_length - len(prompt), 0)]
    if len(completion) == 0:
        return None
    return TokenizedGroup(id=prompt_of.id, kind="unpaired", node_tokens=[prompt, completion],
                          node_parent=[-1, 0], responses=[[1]],
                          scores=np.ones(1, np.float32))


def mismatched_pairs(groups: Sequence[TokenizedGroup], cfg: BatchConfig, row_offset: int,
                     max_length: int) -> dict[str, np.ndarray]:
    """The ``kl_*`` arrays of ``groups`` (a batch's groups, in order) paired with the previous
    group's completion, packed with the batch's shapes ``cfg``."""
    cfg = dataclasses.replace(cfg, with_ref_logps=False)
    builder = BatchBuilder(cfg, row_offset)
    n = len(groups)
    for i, group in enumerate(groups):
        pair = mismatched_group(group, groups[(i - 1) % n], max_length) if n else None
        if pair is None:
            continue
        units = group_units(pair, cfg.layout)
        if fits_in_row(units, cfg):
            builder.add(pair, units)
    out = builder.finish()
    return {f"kl_{k}": out[k] for k in KEYS}
