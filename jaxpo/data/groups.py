"""Raw record → checked :class:`Record` → :class:`TokenizedGroup`: tokenisation, truncation, labels.

Token layout for pairs, lists and unpaired records (the same ids as TRL's DPO preprocessing):

- conversational: ``prompt_ids`` = the prompt rendered with ``add_generation_prompt=True``;
  ``full_k`` = the render of ``prompt + completion_k``; both encoded without special tokens;
- plain text: EOS text is appended to each completion that does not already end with it;
  ``prompt_ids`` = encode(prompt), ``full_k`` = encode(prompt + completion_k), with special tokens;
- the prompt node is ``prompt_ids[:P]`` and response k is ``full_k[P:]``, where P is the shortest
  common prefix of ``prompt_ids`` with every ``full_k`` (where a template or a merge across the
  boundary makes them diverge, the completion starts where they diverge).

Trees tokenise each step on its own (shared steps must be shared tokens): the prompt as above,
each step without special tokens, and each leaf followed by the EOS text (plain text) or by what
the chat template writes after an assistant message's content (conversational).

Every setting is a field of :class:`jaxpo.config.DataConfig`. Length limits (see docs/data.md):
``max_prompt_length`` (0 = none) cuts the prompt (``truncation_mode``: ``keep_start`` keeps its
first tokens, ``keep_end`` its last); a prompt of ``max_length`` tokens or more drops the group;
each response is cut at its end so that prompt + response fits ``max_length`` — in a tree only
within steps no other response shares (a response whose cut falls in a shared step is dropped).
A response left empty is dropped, and a group left with fewer than 2 responses (1 for unpaired)
is dropped; everything is counted. List and tree scores become ψ labels by ``label_mapping``
(:mod:`jaxpo.data.labels`): ``DataConfig.label_mapping``, else the objective's own (passed by the
trainer), else ``minmax``.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jinja2
import numpy as np

from jaxpo.config import DataConfig
from jaxpo.data import labels
from jaxpo.data.errors import BadRecordError, RecordCounters, Where
from jaxpo.data.records import Record, parse_record
from jaxpo.data.sources import RawRecord
from jaxpo.data.tokenize import Tokenizer
from jaxpo.data.types import TokenizedGroup

_SENTINEL = "\x00jaxpo-completion\x00"


@dataclasses.dataclass
class BuildResult:
    """What one record became: the group (None when skipped or dropped) and its counts."""

    group: TokenizedGroup | None
    counts: dict[str, int]
    error: BadRecordError | None = None


class GroupBuilder:
    """Callable ``RawRecord | dict → TokenizedGroup | None``, picklable for grain workers.

    ``builder(raw)`` returns None when the record is skipped (``on_bad_record="skip"``) or dropped
    by the length limits, and adds to ``builder.counters``. In worker processes those counters
    stay in the worker: use :meth:`build`, whose result carries the counts, to bring them back.

    Args:
      tokenizer: the model's :class:`Tokenizer`.
      cfg: the data config; the builder reads ``format``, ``max_length``, ``max_prompt_length``
        (0 = no limit), ``truncation_mode``, ``max_responses``, ``max_steps``,
        ``on_bad_record`` and ``label_mapping``.
      label_mapping: scores → ψ (:data:`jaxpo.data.labels.MAPPINGS`) when
        ``cfg.label_mapping`` is empty: the objective's own mapping, which the trainer passes.
        If both are empty, ``minmax``.
      kinds: the group kinds the objective trains on; a record of another kind is a bad
        record (``kind_not_trainable``: an error naming the file and line, or skipped and
        counted). None accepts every kind.
    """

    def __init__(self, tokenizer: Tokenizer, cfg: DataConfig, *,
                 label_mapping: str | None = None, kinds: tuple[str, ...] | None = None):
        if not isinstance(cfg, DataConfig):
            raise TypeError(f"GroupBuilder: cfg must be a jaxpo.config.DataConfig, got "
                            f"{type(cfg).__name__}")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.label_mapping = cfg.label_mapping or label_mapping or "minmax"
        if self.label_mapping not in labels.MAPPINGS:
            raise ValueError(f"label_mapping={self.label_mapping!r}: expected one of "
                             f"{labels.MAPPINGS}")
        self.kinds = tuple(kinds) if kinds else None
        self.counters = RecordCounters()

    def __call__(self, raw: RawRecord | dict[str, Any]) -> TokenizedGroup | None:
        result = self.build(raw)
        self.counters.merge(result.counts)
        return result.group

    def parse(self, raw: RawRecord | dict[str, Any]) -> Record:
        """Checks and normalises a raw record (raises :class:`BadRecordError`)."""
        if not isinstance(raw, RawRecord):
            raw = RawRecord(0, raw, Where())
        if raw.error is not None:
            raise raw.error
        cfg = self.cfg
        record = parse_record(raw.data, format=cfg.format, record_id=raw.id, where=raw.where,
                              max_responses=cfg.max_responses, max_steps=cfg.max_steps)
        if self.kinds is not None and record.kind not in self.kinds:
            raise BadRecordError(record.where, "kind", "kind_not_trainable",
                                 f"a {record.kind} record, but the objective trains on "
                                 f"{list(self.kinds)} (set data.format, or filter the data)")
        return record

    def build(self, raw: RawRecord | dict[str, Any]) -> BuildResult:
        """The group and the counts for one record; raises only with ``on_bad_record="error"``."""
        counts: collections.Counter[str] = collections.Counter()
        try:
            record = self.parse(raw)
            try:
                prompt, nodes, parents, paths = self._tokens(record)
            except jinja2.exceptions.TemplateError as e:
                raise BadRecordError(record.where, "prompt", "chat_template",
                                     f"chat template error: {e}") from None
        except BadRecordError as e:
            if self.cfg.on_bad_record == "error":
                raise
            counts[f"skipped/{e.reason}"] += 1
            return BuildResult(None, dict(counts), e)
        group = self._fit(record, prompt, nodes, parents, paths, counts)
        if group is not None:
            counts["groups"] += 1
        return BuildResult(group, dict(counts))

    # Tokenisation --------------------------------------------------------------------------

    def _tokens(self, rec: Record):
        """Prompt ids, node token lists (node 0 = prompt), parents and response paths."""
        if rec.tree is None:
            prompt, completions = self._flat(rec)
            nodes = [prompt] + completions
            return prompt, nodes, [-1] + [0] * len(completions), [[k + 1] for k in
                                                                   range(len(completions))]
        tok, tree = self.tokenizer, rec.tree
        prompt, closing = self._prompt_ids(rec)
        leaves = set(tree.leaves)
        steps = [tok.encode(t + (closing if n in leaves else ""), add_special_tokens=False)
                 for n, t in enumerate(tree.texts)]
        parents = [-1] + [p + 1 for p in tree.parents]
        paths = [[n + 1 for n in tree.path(leaf)] for leaf in tree.leaves]
        return prompt, [prompt] + steps, parents, paths

    def _flat(self, rec: Record) -> tuple[list[int], list[list[int]]]:
        tok = self.tokenizer
        if rec.conversational:
            prompt = tok.encode(tok.apply_chat_template(rec.prompt, add_generation_prompt=True),
                                add_special_tokens=False)
            fulls = [tok.encode(tok.apply_chat_template(rec.prompt + r), add_special_tokens=False)
                     for r in rec.responses]
        else:
            eos = tok.eos_token
            prompt = tok.encode(rec.prompt)
            fulls = [tok.encode(rec.prompt + (r if not eos or r.endswith(eos) else r + eos))
                     for r in rec.responses]
        p = min(_common_prefix(prompt, f) for f in fulls)
        return prompt[:p], [f[p:] for f in fulls]

    def _prompt_ids(self, rec: Record) -> tuple[list[int], str]:
        """Prompt ids of a tree and the text that closes each leaf."""
        tok = self.tokenizer
        if not rec.conversational:
            eos = tok.eos_token or ""
            return tok.encode(rec.prompt), eos
        rendered = tok.apply_chat_template(rec.prompt, add_generation_prompt=True)
        full = tok.apply_chat_template(rec.prompt + [{"role": "assistant", "content": _SENTINEL}])
        closing = full.split(_SENTINEL, 1)[1] if _SENTINEL in full else ""
        return tok.encode(rendered, add_special_tokens=False), closing

    # Length limits and labels --------------------------------------------------------------

    def _fit(self, rec, prompt, nodes, parents, paths, counts) -> TokenizedGroup | None:
        cfg = self.cfg
        nodes = [list(n) for n in nodes]
        if cfg.max_prompt_length and len(prompt) > cfg.max_prompt_length:  # 0: no limit
            cut = cfg.max_prompt_length
            nodes[0] = nodes[0][:cut] if cfg.truncation_mode == "keep_start" else nodes[0][-cut:]
            counts["truncated/prompt"] += 1
            counts["truncated/prompt_tokens"] += len(prompt) - cut
        p = len(nodes[0])
        if p == 0 or p >= cfg.max_length:
            counts["dropped/empty_prompt" if p == 0 else "dropped/prompt_too_long"] += 1
            return None
        uses = collections.Counter(n for path in paths for n in path)
        kept, dropped = [], []
        for k, path in enumerate(paths):
            budget = cfg.max_length - p
            new_path, reason = [], None
            for n in path:
                if len(nodes[n]) <= budget:
                    budget -= len(nodes[n])
                    new_path.append(n)
                    continue
                if uses[n] > 1:
                    reason = "shared_step_too_long"
                elif budget > 0:
                    counts["truncated/response_tokens"] += len(nodes[n]) - budget
                    nodes[n] = nodes[n][:budget]
                    new_path.append(n)
                    counts["truncated/response"] += 1
                break
            if reason is None and sum(len(nodes[n]) for n in new_path) == 0:
                reason = "empty_response"
            elif reason is None and not all(nodes[n] for n in new_path):
                reason = "empty_step"
            if reason is None:
                kept.append((k, new_path))
            else:
                dropped.append(reason)
        min_k = 1 if rec.kind == "unpaired" else 2
        if len(kept) < min_k:
            counts[f"dropped/{dropped[0]}"] += 1
            return None
        seqs = [tuple(t for n in path for t in nodes[n]) for _, path in kept]
        if len(set(seqs)) < len(seqs):
            counts["dropped/duplicate_after_truncation"] += 1
            return None
        scores = self._labels(rec, [k for k, _ in kept])
        if scores is None:
            counts["dropped/no_preference"] += 1
            return None
        for reason in dropped:
            counts[f"dropped_response/{reason}"] += 1
        return _compact(rec, nodes, parents, kept, scores)

    def _labels(self, rec: Record, ks: list[int]) -> np.ndarray | None:
        if rec.kind in ("pair", "unpaired"):
            return np.asarray([rec.scores[k] for k in ks], np.float32)
        if rec.ranks is not None:
            ranks = [rec.ranks[k] for k in ks]
            return None if len(set(ranks)) < 2 else labels.ranks_to_psi(ranks)
        scores = [rec.scores[k] for k in ks]
        if len(set(scores)) < 2 and self.label_mapping != "raw":
            return None
        return labels.scores_to_psi(scores, self.label_mapping)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _compact(rec: Record, nodes, parents, kept, scores) -> TokenizedGroup:
    """Keeps the prompt and the nodes on kept paths, renumbered in their original order."""
    used = sorted({0} | {n for _, path in kept for n in path})
    new = {old: i for i, old in enumerate(used)}
    ref = None
    if rec.ref_logps is not None:
        ref = np.asarray([rec.ref_logps[k] for k, _ in kept], np.float32)
    return TokenizedGroup(
        id=rec.id,
        kind=rec.kind,
        node_tokens=[np.asarray(nodes[n], np.int32) for n in used],
        node_parent=[-1 if n == 0 else new[parents[n]] for n in used],
        responses=[[new[n] for n in path] for _, path in kept],
        scores=np.asarray(scores, np.float32),
        ref_logps=ref,
        margin=0.0 if rec.margin is None else float(rec.margin),
    )
