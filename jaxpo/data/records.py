"""Record schemas: format detection and parsing of raw dicts into a checked :class:`Record`.

Field names follow TRL's where it has them (see docs/data.md for every format):

- pair: ``prompt``/``chosen``/``rejected`` (strings or ``[{role, content}]`` message lists), or
  ``chosen``/``rejected`` only (implicit prompt: their common prefix); optional
  ``ref_chosen_logps``/``ref_rejected_logps``, and ``margin`` (a reward model's per-pair
  Bradley–Terry margin).
- list: ``prompt``, ``responses`` (K strings or message lists), ``scores`` (higher is better) or
  ``ranks`` (1 = best); optional ``ref_logps`` (K floats).
- tree: ``prompt`` and ``tree`` (nested ``{text, reward?, score?, children}``), or ``prompt`` and
  ``responses: [{steps: [str, ...], score}]`` (identical step prefixes are merged).
- unpaired: ``prompt``, ``completion``, ``label`` (bool); optional ``ref_logps`` (one float).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxpo.config import KINDS
from jaxpo.data import validate as v
from jaxpo.data.errors import Where

FORMATS = ("auto",) + KINDS


@dataclasses.dataclass
class Tree:
    """Step nodes of a tree group (the prompt is not a node here).

    Attributes:
      texts: step text per node.
      parents: parent node per node, −1 for a child of the prompt; parents precede children.
      leaves: the last node of each response, in response order.
      rewards: optional per-step reward per node (None where not given).
    """

    texts: list[str]
    parents: list[int]
    leaves: list[int]
    rewards: list[float | None]

    def path(self, leaf: int) -> list[int]:
        """Nodes from the prompt's child down to ``leaf``."""
        out = []
        while leaf >= 0:
            out.append(leaf)
            leaf = self.parents[leaf]
        return out[::-1]


@dataclasses.dataclass
class Record:
    """A parsed, checked record: one prompt and its responses with their preference signal.

    Attributes:
      id: record index in the dataset.
      kind: ``pair``, ``list``, ``tree`` or ``unpaired``.
      prompt: prompt text, or message list when ``conversational``.
      conversational: whether prompt and responses are message lists.
      responses: completions (strings or message lists); empty for trees (see ``tree``).
      scores: ``[K]`` raw scores (higher is better); pair ``[1, 0]``; unpaired ``[1]``/``[0]``.
      ranks: ``[K]`` ranks (1 = best) when the record gave ranks instead of scores.
      tree: the step tree of a tree record.
      ref_logps: ``[K]`` precomputed reference log-probs, or None.
      margin: a pair's ``margin`` field (reward models), or None.
      where: the record's file and line/row.
    """

    id: int
    kind: str
    prompt: str | list[v.Message]
    conversational: bool
    responses: list[str | list[v.Message]]
    scores: list[float] | None = None
    ranks: list[int] | None = None
    tree: Tree | None = None
    ref_logps: list[float] | None = None
    margin: float | None = None
    where: Where = dataclasses.field(default_factory=Where)

    @property
    def num_responses(self) -> int:
        return len(self.tree.leaves) if self.tree is not None else len(self.responses)


def detect_format(record: dict[str, Any], where: Where | None = None) -> str:
    """The record kind implied by its fields.

    >>> detect_format({"prompt": "p", "chosen": "a", "rejected": "b"})
    'pair'
    >>> detect_format({"prompt": "p", "responses": [{"steps": ["a"], "score": 1}]})
    'tree'
    """
    if "tree" in record:
        return "tree"
    if "responses" in record:
        r = record["responses"]
        is_steps = isinstance(r, (list, tuple)) and len(r) and isinstance(r[0], dict) and (
            "steps" in r[0])
        return "tree" if is_steps else "list"
    if "chosen" in record or "rejected" in record:
        return "pair"
    if "completion" in record or "label" in record:
        return "unpaired"
    raise v.bad(where or Where(), "<record>", "unknown_format",
                f"cannot tell the format from fields {sorted(record)}")


def parse_record(
    record: dict[str, Any],
    *,
    format: str = "auto",
    record_id: int = 0,
    where: Where | None = None,
    max_responses: int | None = None,
    max_steps: int | None = None,
) -> Record:
    """Checks a raw record and normalises it.

    Args:
      record: the raw dict (a JSON object, Parquet row, ...).
      format: ``auto`` (detect from the fields) or a kind from :data:`KINDS`.
      record_id: the record's index in the dataset.
      where: file and line/row, for error messages.
      max_responses: largest K accepted for lists and trees (None: no limit).
      max_steps: largest number of steps on a tree path (None: no limit).

    Returns:
      The :class:`Record`.

    Raises:
      BadRecordError: naming the file, line/row and field.
    """
    where = where or Where()
    if not isinstance(record, dict):
        raise v.bad(where, "<record>", "wrong_type",
                    f"expected an object, got {type(record).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    kind = detect_format(record, where) if format == "auto" else format
    parse = {"pair": _pair, "list": _list, "tree": _tree, "unpaired": _unpaired}[kind]
    return parse(record, record_id, where, max_responses, max_steps)


def _conversational(record: dict[str, Any], fields: tuple[str, ...]) -> bool:
    return any(v.is_messages(record.get(f)) for f in fields)


def _pair(record, record_id, where, max_responses, max_steps) -> Record:
    conv = _conversational(record, ("prompt", "chosen", "rejected"))
    chosen = v.check_turn(v.require(record, "chosen", where), "chosen", where, conv)
    rejected = v.check_turn(v.require(record, "rejected", where), "rejected", where, conv)
    if record.get("prompt") is None:
        prompt, chosen, rejected = _extract_prompt(chosen, rejected, where)
    else:
        prompt = v.check_turn(record["prompt"], "prompt", where, conv)
    if chosen == rejected:
        raise v.bad(where, "rejected", "identical_responses", "chosen and rejected are equal")
    ref = None
    has_ref = [record.get(f) is not None for f in ("ref_chosen_logps", "ref_rejected_logps")]
    if any(has_ref):
        ref = [v.check_number(v.require(record, f, where), f, where)
               for f in ("ref_chosen_logps", "ref_rejected_logps")]
    margin = None
    if record.get("margin") is not None:
        margin = v.check_number(record["margin"], "margin", where)
    return Record(record_id, "pair", prompt, conv, [chosen, rejected], [1.0, 0.0], ref_logps=ref,
                  margin=margin, where=where)


def _extract_prompt(chosen, rejected, where):
    """Splits an implicit prompt off chosen/rejected: their longest common prefix.

    Message lists split at the first differing message. Strings split at the first differing
    character; a space just before it goes with the completions (TRL's ``extract_prompt`` rule).
    """
    n = min(len(chosen), len(rejected))
    i = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if isinstance(chosen, str) and 0 < i < n and chosen[i - 1] == " ":
        i -= 1
    if i == 0:
        raise v.bad(where, "prompt", "no_common_prompt",
                    "no prompt given and chosen/rejected share no common prefix")
    if i >= len(chosen) or i >= len(rejected):
        raise v.bad(where, "prompt", "no_common_prompt",
                    "no prompt given and one of chosen/rejected is a prefix of the other")
    return chosen[:i], chosen[i:], rejected[i:]


def _list(record, record_id, where, max_responses, max_steps) -> Record:
    conv = _conversational(record, ("prompt",)) or (
        isinstance(record.get("responses"), (list, tuple))
        and any(v.is_messages(r) for r in record["responses"]))
    prompt = v.check_turn(v.require(record, "prompt", where), "prompt", where, conv)
    raw = v.require(record, "responses", where)
    if not isinstance(raw, (list, tuple)) or isinstance(raw, str):
        raise v.bad(where, "responses", "wrong_type", f"expected a list, got {type(raw).__name__}")
    v.check_count(len(raw), "responses", where, max_responses)
    responses = [v.check_turn(r, f"responses[{i}]", where, conv) for i, r in enumerate(raw)]
    v.check_distinct(responses, "responses", where)
    scores, ranks = _scores_or_ranks(record, where, len(responses))
    ref = record.get("ref_logps")
    ref = None if ref is None else v.check_numbers(ref, "ref_logps", where, len(responses))
    return Record(record_id, "list", prompt, conv, responses, scores, ranks, ref_logps=ref,
                  where=where)


def _scores_or_ranks(record, where, k):
    has_scores, has_ranks = record.get("scores") is not None, record.get("ranks") is not None
    if has_scores == has_ranks:
        raise v.bad(where, "scores", "missing_field" if not has_scores else "wrong_type",
                    "give exactly one of 'scores' and 'ranks'")
    if has_scores:
        scores = v.check_numbers(record["scores"], "scores", where, k)
        v.check_preference(scores, "scores", where)
        return scores, None
    ranks = v.check_ranks(record["ranks"], "ranks", where, k)
    v.check_preference(ranks, "ranks", where)
    return None, ranks


def _unpaired(record, record_id, where, max_responses, max_steps) -> Record:
    conv = _conversational(record, ("prompt", "completion"))
    prompt = v.check_turn(v.require(record, "prompt", where), "prompt", where, conv)
    completion = v.check_turn(v.require(record, "completion", where), "completion", where, conv)
    label = v.check_bool(v.require(record, "label", where), "label", where)
    ref = record.get("ref_logps")
    ref = None if ref is None else [v.check_number(ref, "ref_logps", where)]
    return Record(record_id, "unpaired", prompt, conv, [completion], [float(label)],
                  ref_logps=ref, where=where)


def _tree(record, record_id, where, max_responses, max_steps) -> Record:
    prompt_raw = v.require(record, "prompt", where)
    conv = v.is_messages(prompt_raw)
    prompt = v.check_turn(prompt_raw, "prompt", where, conv)
    if record.get("tree") is not None:
        tree, scores = _nested_tree(record["tree"], where, max_steps)
    else:
        tree, scores = _flat_tree(v.require(record, "responses", where), where, max_steps)
    v.check_count(len(tree.leaves), "tree", where, max_responses)
    v.check_preference(scores, "tree", where)
    return Record(record_id, "tree", prompt, conv, [], scores, tree=tree, where=where)


def _nested_tree(root: Any, where: Where, max_steps: int | None) -> tuple[Tree, list[float]]:
    """Walks ``{text, reward?, score?, children}`` depth-first (iteratively: no recursion limit).

    A root without text (or a list at the top) is the prompt itself: its children are the first
    steps. A node is a leaf when it has no ``children`` key or an empty list and a score.
    """
    texts, parents, rewards, leaves, scores = [], [], [], [], []
    if isinstance(root, (list, tuple)):
        stack = [(c, f"tree[{i}]", -1, 1) for i, c in reversed(list(enumerate(root)))]
    elif isinstance(root, dict) and not root.get("text"):
        kids = root.get("children") or []
        stack = [(c, f"tree.children[{i}]", -1, 1) for i, c in reversed(list(enumerate(kids)))]
    else:
        stack = [(root, "tree", -1, 1)]
    if not stack:
        raise v.bad(where, "tree", "empty_children", "the tree has no steps")
    while stack:
        node, field, parent, depth = stack.pop()
        if not isinstance(node, dict):
            raise v.bad(where, field, "wrong_type",
                        f"expected a node dict, got {type(node).__name__}")
        if max_steps is not None and depth > max_steps:
            raise v.bad(where, field, "tree_too_deep", f"depth {depth} > max_steps={max_steps}")
        text = v.check_text(v.require(node, "text", where), f"{field}.text", where)
        reward = node.get("reward")
        reward = None if reward is None else v.check_number(reward, f"{field}.reward", where)
        idx = len(texts)
        texts.append(text), parents.append(parent), rewards.append(reward)
        children = node.get("children")
        if children is not None and not isinstance(children, (list, tuple)):
            raise v.bad(where, f"{field}.children", "wrong_type", "expected a list")
        if children:
            stack.extend((c, f"{field}.children[{i}]", idx, depth + 1)
                         for i, c in reversed(list(enumerate(children))))
            continue
        score = reward if node.get("score") is None else node["score"]
        if score is None:
            reason = "empty_children" if children is not None else "leaf_without_score"
            detail = "empty children and no score" if children is not None else "leaf without score"
            raise v.bad(where, f"{field}.score", reason, detail + " or reward")
        leaves.append(idx)
        scores.append(v.check_number(score, f"{field}.score", where))
    tree = Tree(texts, parents, leaves, rewards)
    v.check_distinct([[texts[n] for n in tree.path(leaf)] for leaf in leaves], "tree", where)
    return tree, scores


def _flat_tree(raw: Any, where: Where, max_steps: int | None) -> tuple[Tree, list[float]]:
    """Builds a tree from ``[{steps: [str, ...], score}]`` by merging identical step prefixes."""
    if not isinstance(raw, (list, tuple)):
        raise v.bad(where, "responses", "wrong_type", "expected a list of {steps, score}")
    texts, parents, leaves, scores = [], [], [], []
    children: dict[tuple[int, str], int] = {}
    for i, resp in enumerate(raw):
        field = f"responses[{i}]"
        if not isinstance(resp, dict):
            raise v.bad(where, field, "wrong_type", "expected {steps, score}")
        steps = v.require(resp, "steps", where)
        if not isinstance(steps, (list, tuple)) or not len(steps):
            raise v.bad(where, f"{field}.steps", "empty", "expected a non-empty list of strings")
        if max_steps is not None and len(steps) > max_steps:
            raise v.bad(where, f"{field}.steps", "tree_too_deep",
                        f"depth {len(steps)} > max_steps={max_steps}")
        score = resp.get("reward") if resp.get("score") is None else resp["score"]
        if score is None:
            raise v.bad(where, f"{field}.score", "leaf_without_score", "missing")
        scores.append(v.check_number(score, f"{field}.score", where))
        node = -1
        for j, step in enumerate(steps):
            text = v.check_text(step, f"{field}.steps[{j}]", where)
            if (node, text) not in children:
                children[(node, text)] = len(texts)
                texts.append(text), parents.append(node)
            node = children[(node, text)]
        leaves.append(node)
    v.check_distinct(leaves, "responses", where)
    inner = set(parents)
    for i, leaf in enumerate(leaves):
        if leaf in inner:
            raise v.bad(where, f"responses[{i}].steps", "duplicate_responses",
                        "its steps are a prefix of another response's steps")
    return Tree(texts, parents, leaves, [None] * len(texts)), scores
