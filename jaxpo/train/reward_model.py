"""Scoring texts with a reward model: a trained run's workdir or an exported Hugging Face dir.

    score = load_scorer("runs/rm_tiny")      # or an exported *ForSequenceClassification dir
    rewards = score(["sort: c a b ->"], [" a b c"])             # float32 [1]
    score_file(score, "records.jsonl", "rewards.jsonl")         # what `jaxpo score` runs

A reward model is the decoder with a scalar head (``model.head="reward"``), trained by the
``bradley_terry`` objective. Each (prompt, response) is tokenised exactly as in training (the
prompt node, then the response with its EOS) and laid out one per row; its reward is the head
at the response's last token (:func:`jaxpo.train.loss_inputs.response_rewards`). Nothing is
truncated: rows are as long as the longest text of a batch (rounded up to a power of two, so a
few shapes are compiled), up to the model's ``max_position_embeddings``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from jaxpo import config as config_lib
from jaxpo.data.batcher import BatchConfig, pack_groups
from jaxpo.data.errors import BadRecordError, Where
from jaxpo.data.groups import GroupBuilder
from jaxpo.data.sources import RawRecord, RecordSource
from jaxpo.data.types import TokenizedGroup
from jaxpo.data.validate import bad, is_messages
from jaxpo.models.hf_io import read_config
from jaxpo.train.checkpoint import Checkpointer, abstract_like
from jaxpo.train.loss_inputs import BATCH_KEYS, response_rewards
from jaxpo.train.setup import Run, build_run

# Fields a record to score may hold: one response, or both sides of a pair.
RESPONSE_FIELDS = ("response", "completion")
PAIR_FIELDS = ("chosen", "rejected")
_MIN_LENGTH = 16  # shortest row length a batch is padded to


def reward_config(path: str) -> tuple[config_lib.Config, int | None]:
    """``(config, checkpoint step)`` of the reward model at ``path``: a jaxpo workdir (its
    newest checkpoint's stored config) or an exported Hugging Face directory (step None).

    Raises:
      ValueError: ``path`` holds neither, or holds a model that is not a reward model.
    """
    if os.path.isdir(os.path.join(path, "checkpoints")):
        ckpt = Checkpointer(path)
        try:
            step = ckpt.latest_step()
            stored = None if step is None else ckpt.read_json(step, "config")
        finally:
            ckpt.close()
        if stored is None:
            raise ValueError(f"{path}: no checkpoint with a stored config in this workdir")
        config = config_lib.from_dict(stored)
        if config.model.head != "reward":
            raise ValueError(f"{path}: the run trains a causal LM (model.head="
                             f"{config.model.head!r}), not a reward model")
        return config, step
    if os.path.isfile(os.path.join(path, "config.json")):
        if read_config(path).head != "reward":
            raise ValueError(f"{path}: config.json describes a causal LM, not a reward model "
                             "(architectures [*ForSequenceClassification], num_labels 1)")
        config = config_lib.replace(config_lib.Config(), {
            "model": {"path": path, "head": "reward"}, "loss": {"name": "bradley_terry"},
            "reference": {"mode": "none"}})
        return config, None
    raise ValueError(f"{path}: neither a jaxpo workdir (checkpoints/) nor an exported model "
                     "directory (config.json)")


def load_scorer(path: str, *, batch_size: int = 32) -> RewardScorer:
    """The reward model at ``path`` as ``score(prompts, responses) -> float32 [n]``.

    Args:
      path: a jaxpo workdir of a reward-model run (its newest checkpoint) or a directory
        written by ``jaxpo export`` of one (or any Hugging Face ``*ForSequenceClassification``
        checkpoint of the supported families with ``num_labels`` 1).
      batch_size: texts per device batch.

    Returns:
      A :class:`RewardScorer`, ``score(prompts, responses)``: prompts and responses (strings,
      or message lists for a chat template) of equal length n → rewards ``[n]`` float32.
    """
    config, step = reward_config(path)
    run = build_run(config)
    shardings = run.state_shardings.params
    if step is None:
        params = run.initial_params()  # the exported weights, read shard by shard
    else:
        ckpt = Checkpointer(path)
        try:
            params = ckpt.restore_params(step, abstract_like(run.abstract_params, shardings))
        finally:
            ckpt.close()
    return RewardScorer(run, params, batch_size)


@dataclasses.dataclass
class RewardScorer:
    """``scorer(prompts, responses) -> float32 [n]``: a reward model and its tokenizer.

    Attributes:
      run: the reward model's :class:`jaxpo.train.setup.Run` (model, tokenizer, mesh).
      params: its parameters.
      batch_size: texts per device batch.
    """

    run: Run
    params: Any
    batch_size: int

    def __post_init__(self):
        limit = self.run.model_cfg.max_position_embeddings
        data = config_lib.DataConfig(format="unpaired", max_responses=1, max_length=limit)
        self.builder = GroupBuilder(self.run.tokenizer, data)
        self.limit = limit
        graphdef = self.run.graphdef

        def rewards(params, batch):
            with self.run.spec.rules_context():
                return response_rewards(graphdef, params, batch, num_nodes=2)[:, 0]  # [B]

        self._rewards = jax.jit(rewards)

    def __call__(self, prompts: Sequence[Any], responses: Sequence[Any]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        where = [Where("<texts>", i) for i in range(len(prompts))]
        groups = [self.group(p, r, w, "response") for p, r, w in zip(prompts, responses, where)]
        return self.score_groups(groups)

    def group(self, prompt: Any, response: Any, where: Where, field: str) -> TokenizedGroup:
        """The one-response group of ``(prompt, response)``; errors name ``where`` and
        ``field``."""
        record = {"prompt": prompt, "completion": response, "label": True}
        try:
            group = self.builder.build(RawRecord(0, record, where)).group
        except BadRecordError as e:
            raise BadRecordError(where, field if e.field == "completion" else e.field,
                                 e.reason, e.detail) from None
        if group is None:
            raise bad(where, field, "too_long", f"prompt + response longer than the model's "
                      f"max_position_embeddings={self.limit} tokens")
        return group

    def score_groups(self, groups: Sequence[TokenizedGroup]) -> np.ndarray:
        """Rewards ``[len(groups)]`` float32 of one-response groups."""
        out = np.zeros(len(groups), np.float32)
        for start in range(0, len(groups), self.batch_size):
            chunk = groups[start:start + self.batch_size]
            longest = max(sum(len(t) for t in g.node_tokens) for g in chunk)
            seq = max(_MIN_LENGTH, 2 ** math.ceil(math.log2(longest)))
            cfg = BatchConfig("padded", batch_size=self.batch_size, seq_len=seq,
                              max_responses=1, node_slots=2, rows=self.batch_size)
            batch = pack_groups(chunk, cfg)
            values = self._rewards(self.params, {k: batch[k] for k in BATCH_KEYS})
            out[start:start + len(chunk)] = np.asarray(jax.device_get(values))[:len(chunk)]
        return out


def _records(path: str) -> Iterator[RawRecord]:
    source = RecordSource(path)
    for i in range(len(source)):
        raw = source[i]
        if raw.error is not None:
            raise raw.error
        if not isinstance(raw.data, dict):
            raise bad(raw.where, "<record>", "wrong_type",
                      f"expected an object, got {type(raw.data).__name__}")
        yield raw


def _text(record: dict[str, Any], field: str, where: Where) -> Any:
    value = record.get(field)
    if value is None:
        raise bad(where, field, "missing_field", "missing")
    if not (isinstance(value, str) or is_messages(value)):
        raise bad(where, field, "wrong_type",
                  f"expected a string or a message list, got {type(value).__name__}")
    return value


def score_file(scorer: RewardScorer, in_path: str, out_path: str) -> dict[str, Any]:
    """Writes ``out_path`` (JSONL): each record of ``in_path`` with its reward(s) added.

    A record holds ``prompt`` and either ``response`` or ``completion`` (→ ``reward``), or
    ``chosen`` and ``rejected`` (→ ``chosen_reward``, ``rejected_reward``). Strings, or
    message lists for a chat template. A bad record is an error naming file, line and field.

    Returns:
      ``{"out", "records", "rewards"}`` (counts).
    """
    records, slots, groups = [], [], []
    for raw in _records(in_path):
        rec, where = raw.data, raw.where
        prompt = _text(rec, "prompt", where)
        fields = [f for f in RESPONSE_FIELDS if f in rec][:1] or (
            list(PAIR_FIELDS) if any(f in rec for f in PAIR_FIELDS) else [])
        if not fields:
            raise bad(where, "response", "missing_field", "missing (a record to score holds "
                      "'response' or 'completion', or 'chosen' and 'rejected')")
        names = ["reward"] if fields[0] in RESPONSE_FIELDS else [f"{f}_reward" for f in fields]
        for field, name in zip(fields, names):
            groups.append(scorer.group(prompt, _text(rec, field, where), where, field))
            slots.append((len(records), name))
        records.append(dict(rec))
    rewards = scorer.score_groups(groups)
    for (i, name), value in zip(slots, rewards):
        records[i][name] = float(value)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return {"out": out_path, "records": len(records), "rewards": len(groups)}
