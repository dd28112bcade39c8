"""From a tokenised group to *units*: the token runs that the batcher copies into rows.

A unit is a forest of token nodes in preorder (depth first, children in index order), flattened
into per-token arrays that are relative to the unit's own start. The batcher only adds the row
offsets. Three layouts (docs/architecture.md §2) cut a :class:`TokenizedGroup` into units:

- ``padded``: one unit per response, ``prompt → step_1 → … → leaf`` as a chain of nodes; each
  unit gets its own row.
- ``packed``: one unit per group holding those K chains as sibling roots (the prompt is
  repeated per response); the whole unit shares one segment, and since no chain is an ancestor
  of another, the copies never see each other.
- ``share_prefix``: one unit per group, the group's own tree: the prompt and every shared step
  appear once.

Per token of a unit (``L`` tokens, ``n`` nodes):

- ``positions`` ``[L]``: depth in the tree; a node starts at its parent's end position;
- ``local_node`` ``[L]``: the token's node in unit preorder;
- ``local_pred`` ``[L]``: unit offset of the token whose output predicts this one: ``q - 1``
  inside a node, the parent's last token for a node's first token, ``-1`` for root (prompt)
  tokens, which are never scored;
- ``node_last`` ``[n]``: the largest preorder number in each node's subtree.

>>> import numpy as np
>>> from jaxpo.data.types import TokenizedGroup
>>> g = TokenizedGroup(id=0, kind="pair", node_tokens=[np.array([5, 6]), np.array([7]),
...                    np.array([8, 9])], node_parent=[-1, 0, 0], responses=[[1], [2]],
...                    scores=np.array([1.0, 0.0], np.float32))
>>> (u,) = group_units(g, "share_prefix")
>>> u.tokens.tolist(), u.positions.tolist(), u.local_pred.tolist(), u.node_last.tolist()
([5, 6, 7, 8, 9], [0, 1, 2, 2, 3], [-1, -1, 1, 1, 3], [2, 1, 2])
>>> (p,) = group_units(g, "packed")
>>> p.tokens.tolist(), p.positions.tolist(), p.local_pred.tolist(), p.responses
([5, 6, 7, 5, 6, 8, 9], [0, 1, 2, 0, 1, 2, 3], [-1, -1, 1, -1, -1, 4, 5], [(0, [1]), (1, [3])])
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpo.config import LAYOUTS
from jaxpo.data.types import TokenizedGroup


@dataclasses.dataclass(frozen=True)
class Unit:
    """A forest of token nodes in preorder, flattened; offsets are relative to the unit start.

    Attributes:
      tokens: ``[L]`` int32 token ids.
      positions: ``[L]`` int32 depth of each token in its tree.
      local_node: ``[L]`` int32 preorder number of each token's node within the unit.
      local_pred: ``[L]`` int32 unit offset of the predicting token, -1 if unscored.
      node_last: ``[n]`` int32 largest preorder number in each node's subtree.
      responses: per response of the group placed in this unit, its node path (unit preorder
        numbers, root's child to leaf); entries are ``(k, path)`` pairs with k the response index.
    """

    tokens: np.ndarray
    positions: np.ndarray
    local_node: np.ndarray
    local_pred: np.ndarray
    node_last: np.ndarray
    responses: list[tuple[int, list[int]]]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.node_last.shape[0])


def check_group(group: TokenizedGroup) -> None:
    """Raises ``ValueError`` naming the group if its node tree or response paths are malformed."""
    where = f"group {group.id} ({group.kind})"
    n = len(group.node_tokens)
    if n == 0 or len(group.node_parent) != n:
        raise ValueError(f"{where}: node_tokens and node_parent must have the same, nonzero length")
    if group.node_parent[0] != -1:
        raise ValueError(f"{where}: node 0 (the prompt) must be the root, parent -1")
    for i in range(1, n):
        if not 0 <= group.node_parent[i] < i:
            raise ValueError(f"{where}: node {i} has parent {group.node_parent[i]}; "
                             "parents must precede their children")
    for i, toks in enumerate(group.node_tokens):
        if len(toks) == 0:
            raise ValueError(f"{where}: node {i} has no tokens")
    if not group.responses:
        raise ValueError(f"{where}: no responses")
    if len(group.scores) != len(group.responses):
        raise ValueError(f"{where}: {len(group.scores)} scores for {len(group.responses)} "
                         "responses")
    for k, path in enumerate(group.responses):
        parent = 0
        for node in path:
            if not 0 < node < n or group.node_parent[node] != parent:
                raise ValueError(f"{where}: response {k} path {path} is not a chain from the "
                                 "root's child downwards")
            parent = node
        if not path:
            raise ValueError(f"{where}: response {k} is empty")


def group_units(group: TokenizedGroup, layout: str) -> list[Unit]:
    """Cuts a group into the units of ``layout`` (``padded``: K units; otherwise one)."""
    if layout == "share_prefix":
        paths = [(k, path) for k, path in enumerate(group.responses)]
        return [_forest_unit(group.node_tokens, list(group.node_parent), paths)]
    if layout not in ("padded", "packed"):
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    chains = [_chain(group, k) for k in range(group.num_responses)]
    if layout == "padded":
        return [_forest_unit(*chain) for chain in chains]
    node_tokens, node_parent, paths = [], [], []
    for chain_tokens, chain_parent, chain_paths in chains:
        base = len(node_tokens)
        node_tokens += chain_tokens
        node_parent += [p + base if p >= 0 else -1 for p in chain_parent]
        paths += [(k, [v + base for v in path]) for k, path in chain_paths]
    return [_forest_unit(node_tokens, node_parent, paths)]


def _chain(group: TokenizedGroup, k: int):
    """Response k alone: ``prompt → path nodes`` as a chain (node tokens, parents, paths)."""
    path = group.responses[k]
    node_tokens = [group.node_tokens[0]] + [group.node_tokens[v] for v in path]
    node_parent = list(range(-1, len(path)))
    return node_tokens, node_parent, [(k, list(range(1, len(path) + 1)))]


def _forest_unit(node_tokens, node_parent, paths) -> Unit:
    """Lays out a forest (parents precede children, roots have parent -1) in preorder."""
    n = len(node_tokens)
    children: list[list[int]] = [[] for _ in range(n)]
    roots = []
    for v, p in enumerate(node_parent):
        (roots if p < 0 else children[p]).append(v)
    order = []  # preorder: node ids
    stack = roots[::-1]
    while stack:
        v = stack.pop()
        order.append(v)
        stack.extend(children[v][::-1])
    pre = [0] * n  # preorder number of each node
    for i, v in enumerate(order):
        pre[v] = i
    size = [1] * n  # subtree sizes, accumulated bottom up (children follow parents)
    for v in range(n - 1, 0, -1):
        if node_parent[v] >= 0:
            size[node_parent[v]] += size[v]
    # Per node in preorder (plain lists: n is small): length, token offset, the depth of its
    # first token, and the offset of the token that predicts it (the parent's last, -1 at roots).
    lengths = [len(node_tokens[v]) for v in order]
    offset, start_pos, first_pred = [0] * n, [0] * n, [-1] * n
    for i, v in enumerate(order):
        offset[i] = offset[i - 1] + lengths[i - 1] if i else 0
        p = node_parent[v]
        if p >= 0:
            ip = pre[p]
            start_pos[i] = start_pos[ip] + lengths[ip]
            first_pred[i] = offset[ip] + lengths[ip] - 1
    local_node = np.repeat(np.arange(n, dtype=np.int32), lengths)  # [L]
    q = np.arange(local_node.shape[0], dtype=np.int32)  # [L] unit offsets
    within = q - np.asarray(offset, np.int32)[local_node]  # [L] index inside the node
    node_pred = np.asarray(first_pred, np.int32)[local_node]  # [L]
    local_pred = np.where((within == 0) | (node_pred < 0), node_pred, q - 1)  # [L]
    return Unit(
        tokens=np.concatenate([node_tokens[v] for v in order]).astype(np.int32),
        positions=np.asarray(start_pos, np.int32)[local_node] + within,
        local_node=local_node,
        local_pred=local_pred.astype(np.int32),
        node_last=np.asarray([i + size[v] - 1 for i, v in enumerate(order)], np.int32),
        responses=[(k, [pre[v] for v in path]) for k, path in paths],
    )
