"""From a run config to what the trainer consumes: tokenizer, model config, data iterators.

``data.train_files`` empty means the bundled synthetic task (``jaxpo.tasks.synthetic``): its
train and held-out splits of kind ``data.format`` (``pair`` when ``auto``) are written once into
``<workdir>/data`` and used as train and eval files.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from jaxpo.data.groups import GroupBuilder, GroupConfig
from jaxpo.data.pipeline import make_eval_iterator, make_train_iterator
from jaxpo.data.sources import RecordSource
from jaxpo.data.tokenize import Tokenizer
from jaxpo.models.config import ModelConfig, get_preset
from jaxpo.models.hf_io import read_config
from jaxpo.tasks import synthetic


def tokenizer_dir(config: Any) -> str:
    """``model.tokenizer``, else ``model.path``, else the bundled tiny tokenizer."""
    return config.model.tokenizer or config.model.path or synthetic.tokenizer_dir()


def model_config(config: Any, tokenizer: Tokenizer) -> ModelConfig:
    """The decoder config: from ``model.path``'s config.json, or the preset (tiny presets take
    the tokenizer's vocabulary size)."""
    m = config.model
    common = {"dtype": m.dtype, "param_dtype": m.param_dtype, "remat": m.remat}
    if m.path:
        return read_config(m.path, **common)
    if m.preset.startswith("tiny"):
        common["vocab_size"] = tokenizer.vocab_size
        if tokenizer.eos_id is not None:
            common["eos_token_id"] = tokenizer.eos_id
    return get_preset(m.preset, **common)


def data_files(config: Any, workdir: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(train_files, eval_files)``; the synthetic task's splits when no train files are set."""
    d = config.data
    if d.train_files:
        return tuple(d.train_files), tuple(d.eval_files)
    kind = "pair" if d.format == "auto" else d.format
    out = os.path.join(workdir, "data")
    paths = {s: os.path.join(out, f"{kind}_{s}.jsonl") for s in ("train", "eval")}
    if jax.process_index() == 0 and not all(os.path.exists(p) for p in paths.values()):
        synthetic.write_task(out, kind, seed=config.train.seed)
    if jax.process_count() > 1:  # the others wait until process 0 has written them
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxpo-synthetic-data")
    return (paths["train"],), tuple(d.eval_files) or (paths["eval"],)


def node_slots(config: Any) -> int:
    """``N``: ``data.node_slots``, or enough for two of the largest groups per row."""
    d = config.data
    if d.node_slots:
        return d.node_slots
    k, m = d.max_responses, d.max_steps
    if d.layout == "padded":
        return 1 + m
    per_group = k * (1 + m) if d.layout == "packed" else 1 + k * m
    return 2 * per_group


def group_builder(config: Any, tokenizer: Tokenizer) -> GroupBuilder:
    d = config.data
    cfg = GroupConfig(format=d.format, max_length=d.max_length,
                      max_prompt_length=d.max_prompt_length or None,  # 0: no prompt limit
                      truncation=d.truncation_mode,
                      max_responses=d.max_responses, max_depth=d.max_steps,
                      on_bad_record=d.on_bad_record)
    return GroupBuilder(tokenizer, cfg)


@dataclasses.dataclass(frozen=True)
class WithReference:
    """A group builder that attaches precomputed reference log-probs by record id (picklable).

    Attributes:
      builder: the ``GroupBuilder``.
      table: ``[num_records, K]`` float32 reference log-probs (NaN where not computed).
    """

    builder: GroupBuilder
    table: np.ndarray

    def build(self, raw: Any):
        result = self.builder.build(raw)
        group = result.group
        if group is not None:
            row = self.table[group.id, :group.num_responses]
            if group.id >= len(self.table) or np.isnan(row).any():
                raise ValueError(f"reference cache has no log-probs for record {group.id}; "
                                 "recompute it with `jaxpo precompute-ref`")
            group.ref_logps = row.astype(np.float32)
        return result


def row_length(config: Any) -> int:
    """``S``: the longest group that survives the length limits fits one row.

    ``data.max_length`` bounds prompt + response, per response (the group builder cuts each
    response to it), so a group of K responses under a prompt of ``p >= 1`` tokens has at most
    ``p + K * (max_length - p)`` distinct tokens: ``K * (max_length - 1) + 1`` in the
    ``share_prefix`` layout (prompt and shared steps once), ``K * max_length`` in ``packed``
    (prompt repeated per response), ``max_length`` in ``padded`` (a row per response). A
    shorter row would drop every group longer than it.
    """
    d = config.data
    if d.layout == "padded":
        return d.max_length
    if d.layout == "packed":
        return d.max_responses * d.max_length
    return d.max_responses * (d.max_length - 1) + 1


def iterator_kwargs(config: Any) -> dict[str, Any]:
    d = config.data
    return {"layout": d.layout, "batch_size": d.batch_size, "seq_len": row_length(config),
            "max_responses": d.max_responses, "node_slots": node_slots(config),
            "max_steps": d.max_steps, "rows": d.rows or None,
            "process_index": jax.process_index(), "process_count": jax.process_count()}


def train_iterator(config: Any, files: tuple[str, ...], builder: Any, *,
                   with_ref_logps: bool = False):
    """The shuffled, repeating training iterator (``get_state``/``set_state``, ``counters``)."""
    return make_train_iterator(RecordSource(list(files)), builder, seed=config.train.seed,
                               shuffle=config.data.shuffle, num_workers=config.data.num_workers,
                               with_ref_logps=with_ref_logps, **iterator_kwargs(config))


def eval_iterator(config: Any, files: tuple[str, ...], builder: Any, *,
                  with_ref_logps: bool = False):
    """One ordered pass over ``files``."""
    return make_eval_iterator(RecordSource(list(files)), builder,
                              with_ref_logps=with_ref_logps, **iterator_kwargs(config))
