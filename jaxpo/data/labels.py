"""Maps list and tree scores or ranks to LiPO labels ψ ∈ [0, 1] (higher is better).

LiPO (Liu et al. 2024, "LiPO: Listwise Preference Optimization through Learning-to-Rank") trains on
real-valued labels in [0, 1]: the gain of the λ weights is ``G = 2^ψ − 1``. Its lists are labelled
by the *average win probability* of each response against the others,
``ψ_i = 1/(K−1) Σ_{j≠i} P(y_i ≻ y_j)``. The mappings here:

- ranks (1 = best): the hard average win rate, ties counting ½; for distinct ranks 1..K this is
  ``(K − rank) / (K − 1)`` (best → 1, worst → 0).
- scores, ``mapping="minmax"`` (default): ``(s − min s) / (max s − min s)``, so the best response
  gets 1, the worst 0 and the others keep their relative distances.
- scores, ``mapping="winrate"``: the hard average win rate of the score order (as for ranks).
- scores, ``mapping="bradley_terry"``: ``P(y_i ≻ y_j) = σ(s_i − s_j)`` averaged over j ≠ i, the
  paper's construction when the scores are reward-model logits.
- scores, ``mapping="raw"``: the scores unchanged (for objectives that want raw rewards, e.g. PRO
  or InfoNCA); ranks are still mapped to win rates, since a rank is not a reward.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAPPINGS = ("minmax", "winrate", "bradley_terry", "raw")  # DataConfig.label_mapping, less ""


def win_rate(values: Sequence[float]) -> np.ndarray:
    """Average hard win rate of each entry against the others (higher value wins, ties ½).

    Args:
      values: ``[K]`` scores, higher is better, K ≥ 2.

    Returns:
      ``[K]`` float32 in [0, 1].

    >>> win_rate([3.0, 1.0, 2.0]).tolist()
    [1.0, 0.0, 0.5]
    """
    v = np.asarray(values, np.float64)  # [K]
    wins = (v[:, None] > v[None, :]).sum(1) + 0.5 * ((v[:, None] == v[None, :]).sum(1) - 1)
    return (wins / (len(v) - 1)).astype(np.float32)


def ranks_to_psi(ranks: Sequence[int]) -> np.ndarray:
    """ψ from ranks (1 = best): ``(K − rank) / (K − 1)`` for distinct ranks, ties averaged.

    >>> (ranks_to_psi([2, 1, 4, 3]) * 3).round().tolist()
    [2.0, 3.0, 0.0, 1.0]
    """
    return win_rate(-np.asarray(ranks, np.float64))


def scores_to_psi(scores: Sequence[float], mapping: str = "minmax") -> np.ndarray:
    """ψ from scores (higher is better) by one of :data:`MAPPINGS`.

    Args:
      scores: ``[K]`` finite scores, not all equal (except for ``raw``).
      mapping: ``minmax``, ``winrate``, ``bradley_terry`` or ``raw``.

    Returns:
      ``[K]`` float32.

    >>> scores_to_psi([2.0, 6.0, 4.0]).tolist()
    [0.0, 1.0, 0.5]
    """
    s = np.asarray(scores, np.float64)  # [K]
    if mapping == "minmax":
        span = s.max() - s.min()
        if span == 0:
            return np.full(len(s), 0.5, np.float32)
        return ((s - s.min()) / span).astype(np.float32)
    if mapping == "winrate":
        return win_rate(s)
    if mapping == "bradley_terry":
        p = 1.0 / (1.0 + np.exp(-(s[:, None] - s[None, :])))  # [K, K] P(i beats j)
        return ((p.sum(1) - 0.5) / (len(s) - 1)).astype(np.float32)
    if mapping == "raw":
        return s.astype(np.float32)
    raise ValueError(f"label_mapping must be one of {MAPPINGS}, got {mapping!r}")

