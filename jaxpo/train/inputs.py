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
from jax.experimental import multihost_utils

from jaxpo.config import Config
from jaxpo.data import batcher
from jaxpo.data.groups import GroupBuilder
from jaxpo.data.pipeline import PackIterator, make_eval_iterator, make_train_iterator
from jaxpo.data.sources import RecordSource
from jaxpo.data.tokenize import Tokenizer
from jaxpo.models.config import ModelConfig, get_preset
from jaxpo.models.hf_io import read_config
from jaxpo.models.lora import Lora
from jaxpo.tasks import synthetic


def tokenizer_dir(config: Config) -> str:
    """``model.tokenizer``, else ``model.path``, else the bundled tiny tokenizer."""
    for field in ("tokenizer", "path"):
        path = getattr(config.model, field)
        if path and not os.path.isdir(path):
            raise FileNotFoundError(f"config.model.{field}={path!r}: no such directory")
    return config.model.tokenizer or config.model.path or synthetic.tokenizer_dir()


def model_config(config: Config, tokenizer: Tokenizer) -> ModelConfig:
    """The decoder config: from ``model.path``'s config.json, or the preset (tiny presets take
    the tokenizer's vocabulary size), with ``model.lora``'s adapters when its rank is > 0."""
    m = config.model
    common = {"dtype": m.dtype, "param_dtype": m.param_dtype, "remat": m.remat,
              "attention": m.attention, "attention_block": m.attention_block, "head": m.head}
    if m.lora.rank:  # the adapted model; its base is the same config with lora=None
        common["lora"] = Lora(m.lora.rank, m.lora.alpha, m.lora.targets)
    if m.path:
        cfg = read_config(m.path, **common)
    else:
        if m.preset.startswith("tiny"):
            common["vocab_size"] = tokenizer.vocab_size
            if tokenizer.eos_id is not None:
                common["eos_token_id"] = tokenizer.eos_id
        cfg = get_preset(m.preset, **common)
    if cfg.head == "reward" and cfg.pad_token_id is None:
        # A reward is read at a response's last non-padding token, as transformers reads a
        # *ForSequenceClassification row; the padding token is the tokenizer's, else its EOS
        # (as TRL's reward trainer sets it), and exports record it in config.json.
        pad = tokenizer.specials.get("pad_token")
        pad_id = tokenizer.token_id(pad) if pad else None
        pad_id = tokenizer.eos_id if pad_id is None else pad_id
        if pad_id is not None:
            cfg = cfg.replace(pad_token_id=pad_id)
    return cfg


def data_files(config: Config, workdir: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
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
        multihost_utils.sync_global_devices("jaxpo-synthetic-data")
    return (paths["train"],), tuple(d.eval_files) or (paths["eval"],)


def node_slots(config: Config) -> int:
    """``N``, node slots per row (see :func:`jaxpo.data.batcher.node_slots`)."""
    return batcher.node_slots(config.data)


def group_builder(config: Config, tokenizer: Tokenizer, label_mapping: str,
                  kinds: tuple[str, ...] | None = None) -> GroupBuilder:
    """Records → groups; ``label_mapping`` (the objective's) applies unless
    ``data.label_mapping`` is set; a record of a kind not in ``kinds`` is a bad record."""
    return GroupBuilder(tokenizer, config.data, label_mapping=label_mapping, kinds=kinds)


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
            row = self.table[group.id, :group.num_responses] if group.id < len(self.table) else None
            if row is None or np.isnan(row).any():
                raise ValueError(f"reference cache has no log-probs for record {group.id}; "
                                 "recompute it with `jaxpo precompute-ref`")
            group.ref_logps = row.astype(np.float32)
        return result


def source(config: Config, files: tuple[str, ...]) -> RecordSource:
    """The records of ``files`` (random access; over-long records are bad records)."""
    return RecordSource(list(files), max_record_bytes=config.data.max_record_bytes)


def train_iterator(config: Config, files: tuple[str, ...], builder: Any, *,
                   with_ref_logps: bool = False, mismatched_pairs: bool = False
                   ) -> PackIterator:
    """The shuffled, repeating training iterator (``get_state``/``set_state``, ``counters``)."""
    return make_train_iterator(source(config, files), builder, config.data,
                               seed=config.train.seed, with_ref_logps=with_ref_logps,
                               mismatched_pairs=mismatched_pairs)


def eval_iterator(config: Config, files: tuple[str, ...], builder: Any, *,
                  with_ref_logps: bool = False, mismatched_pairs: bool = False
                  ) -> PackIterator:
    """One ordered pass over ``files``."""
    return make_eval_iterator(source(config, files), builder, config.data,
                              with_ref_logps=with_ref_logps, mismatched_pairs=mismatched_pairs)
