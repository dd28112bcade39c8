"""The tokenised group: what record parsing hands to the batcher (docs/architecture.md §1)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class TokenizedGroup:
    """One prompt and K responses as a tree of token nodes.

    Attributes:
      id: record index in the dataset.
      kind: one of :data:`jaxpo.config.KINDS` (``pair``, ``list``, ``tree``, ``unpaired``).
      node_tokens: token ids per node; node 0 is the prompt (root, never scored).
      node_parent: parent node index per node, -1 for the root; parents precede children.
      responses: per response, the node path from the root's child down to its leaf.
      scores: ``[K]`` float32 labels, higher is better.
      ref_logps: ``[K]`` float32 precomputed reference log-probs, or None.
      margin: a pair's Bradley–Terry margin (the record's ``margin``; 0 without one).
    """

    id: int
    kind: str
    node_tokens: list[np.ndarray]
    node_parent: list[int]
    responses: list[list[int]]
    scores: np.ndarray
    ref_logps: np.ndarray | None = None
    margin: float = 0.0

    @property
    def num_responses(self) -> int:
        return len(self.responses)

    def response_tokens(self, k: int) -> np.ndarray:
        """The concatenated tokens of response k (without the prompt)."""
        return np.concatenate([self.node_tokens[n] for n in self.responses[k]])
