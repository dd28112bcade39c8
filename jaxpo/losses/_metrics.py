"""Batch metrics every objective reports: implicit rewards, log-probs and ranking quality.

Names follow TRL where TRL has them. For a group with two or more real responses the "chosen"
response is the best-labelled one (the first on ties) and the "rejected" the worst-labelled one
(the last on ties), so a pair (chosen first) reads exactly as in TRL. A group with a single real
response (unpaired data) counts as chosen when its label is > 0 and as rejected otherwise, and
takes no part in margins and accuracies. Every metric is a mean over the groups where it is
defined, and 0 when there is none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpo.losses._listwise import ranks
from jaxpo.losses._registry import LossInputs, best_index, take, worst_index


def _mean_over(values: jax.Array, where: jax.Array) -> jax.Array:
    """Mean of ``values [NG]`` over ``where [NG]``; 0 when nothing is selected."""
    total = jnp.sum(jnp.where(where, values, 0.0))
    return total / jnp.maximum(jnp.sum(where), 1).astype(total.dtype)


def preference_metrics(
    inputs: LossInputs, beta: float, *, logps: str = "sum"
) -> dict[str, jax.Array]:
    """Scalar batch metrics from a :class:`~jaxpo.losses.LossInputs` (no gradient needed).

    The implicit reward of a response is ``β·(ℓ − ℓ_ref)`` (``β·ℓ`` without a reference).

    - ``rewards/chosen``, ``rewards/rejected``: mean reward of the chosen / rejected responses;
    - ``rewards/margins``: mean of chosen − rejected; ``rewards/accuracies``: fraction of groups
      with chosen > rejected (strictly);
    - ``logps/chosen``, ``logps/rejected``: mean policy log-probs of the same responses;
    - when K > 2 (lists and trees), per group and then averaged over groups:
      ``ranking/accuracy`` — fraction of label-ordered pairs (ψ_i > ψ_j; tied labels excluded)
      with reward_i > reward_j; ``ranking/kendall_tau`` — (concordant − discordant) / number
      of label-ordered pairs (reward ties count as neither); ``ranking/ndcg`` — NDCG of the
      order by reward with gains ``2^ψ − 1`` and discount ``log₂(1 + rank)`` (reward ties
      broken by position; groups whose ideal DCG is 0 are skipped).

    Args:
        inputs: the per-group arrays ``[NG, K]``.
        beta: β of the implicit reward.
        logps: ``"sum"`` or ``"mean"`` — which log-probs rewards and ``logps/*`` use.

    Returns:
        A dict of scalar arrays.

    >>> import numpy as np
    >>> inputs = LossInputs(policy_logps=np.array([[-1.0, -3.0]]), scores=np.array([[1.0, 0.0]]),
    ...     num_tokens=np.array([[2, 2]]), response_mask=np.ones((1, 2), bool),
    ...     group_mask=np.ones(1, bool), reference_logps=np.array([[-2.0, -2.0]]))
    >>> metrics = preference_metrics(inputs, 0.1)
    >>> round(float(metrics["rewards/margins"]), 4), float(metrics["rewards/accuracies"])
    (0.2, 1.0)
    """
    if logps == "mean":
        policy, reference = inputs.mean_logps()
    elif logps in ("sum", "both"):
        policy, reference = inputs.policy_logps, inputs.reference_logps
    else:
        raise ValueError(f"preference_metrics: logps must be 'sum' or 'mean', got {logps!r}")
    policy = jax.lax.stop_gradient(jnp.asarray(policy, jnp.float32))  # [NG, K]
    log_ratio = policy if reference is None else policy - jnp.asarray(reference, jnp.float32)
    rewards = jax.lax.stop_gradient(beta * log_ratio)  # [NG, K]
    scores = jnp.asarray(inputs.scores, jnp.float32)
    group = jnp.asarray(inputs.group_mask, bool)  # [NG]
    mask = jnp.asarray(inputs.response_mask, bool) & group[:, None]  # [NG, K]

    count = jnp.sum(mask, axis=-1)  # [NG]
    best, worst = best_index(scores, mask), worst_index(scores, mask)  # [NG]
    multi = count >= 2
    single = count == 1
    chosen_groups = multi | (single & (take(scores, best) > 0))
    rejected_groups = multi | (single & (take(scores, best) <= 0))
    chosen, rejected = take(rewards, best), take(rewards, worst)  # [NG]
    metrics = {
        "rewards/chosen": _mean_over(chosen, chosen_groups),
        "rewards/rejected": _mean_over(rejected, rejected_groups),
        "rewards/margins": _mean_over(chosen - rejected, multi),
        "rewards/accuracies": _mean_over((chosen > rejected).astype(jnp.float32), multi),
        "logps/chosen": _mean_over(take(policy, best), chosen_groups),
        "logps/rejected": _mean_over(take(policy, worst), rejected_groups),
    }
    if scores.shape[-1] > 2:
        metrics.update(_ranking_metrics(rewards, scores, mask))
    return metrics


def _ranking_metrics(rewards: jax.Array, scores: jax.Array, mask: jax.Array) -> dict:
    """``ranking/*`` metrics from rewards, labels and the response mask ``[NG, K]``."""
    both = mask[:, :, None] & mask[:, None, :]  # [NG, K, K]
    pairs = both & (scores[:, :, None] > scores[:, None, :])  # ψ_i > ψ_j
    reward_gap = rewards[:, :, None] - rewards[:, None, :]  # [NG, K, K]
    num_pairs = jnp.sum(pairs, axis=(1, 2)).astype(jnp.float32)  # [NG]
    concordant = jnp.sum(pairs & (reward_gap > 0), axis=(1, 2)).astype(jnp.float32)
    discordant = jnp.sum(pairs & (reward_gap < 0), axis=(1, 2)).astype(jnp.float32)
    has_pairs = num_pairs > 0
    safe_pairs = jnp.maximum(num_pairs, 1.0)

    gains = jnp.where(mask, jnp.exp2(jnp.where(mask, scores, 0.0)) - 1.0, 0.0)  # [NG, K]
    dcg = jnp.sum(jnp.where(mask, gains / jnp.log2(1.0 + ranks(rewards, mask)), 0.0), axis=-1)
    ideal = jnp.sum(jnp.where(mask, gains / jnp.log2(1.0 + ranks(scores, mask)), 0.0), axis=-1)
    has_ideal = ideal > 0
    return {
        "ranking/accuracy": _mean_over(concordant / safe_pairs, has_pairs),
        "ranking/ndcg": _mean_over(dcg / jnp.where(has_ideal, ideal, 1.0), has_ideal),
        "ranking/kendall_tau": _mean_over((concordant - discordant) / safe_pairs, has_pairs),
    }


def reward_metrics(inputs: LossInputs) -> dict[str, jax.Array]:
    """Scalar batch metrics of a reward model from ``inputs.rewards`` ``[NG, K]``.

    - ``accuracy``: fraction of groups whose best-labelled response gets a higher reward than
      the worst-labelled one (strictly; groups with tied labels are excluded);
    - ``margin``: mean reward gap best − worst over the same groups;
    - ``rewards/chosen``, ``rewards/rejected``: mean reward of the best / worst responses;
    - ``mean_reward``, ``min_reward``, ``max_reward``, ``std_reward``: over every real response
      (TRL's reward-trainer names, and the standard deviation);
    - when K > 2, ``ranking/accuracy``, ``ranking/ndcg``, ``ranking/kendall_tau`` as in
      :func:`preference_metrics`, with the reward-model's rewards.

    >>> import numpy as np
    >>> inputs = LossInputs(policy_logps=None, scores=np.array([[1.0, 0.0], [1.0, 0.0]]),
    ...     num_tokens=np.ones((2, 2)), response_mask=np.ones((2, 2), bool),
    ...     group_mask=np.ones(2, bool), rewards=np.array([[2.0, 0.0], [0.0, 1.0]]))
    >>> {k: float(v) for k, v in reward_metrics(inputs).items()}["accuracy"]
    0.5
    """
    rewards = jax.lax.stop_gradient(jnp.asarray(inputs.rewards, jnp.float32))  # [NG, K]
    scores = jnp.asarray(inputs.scores, jnp.float32)
    mask = jnp.asarray(inputs.response_mask, bool) & jnp.asarray(inputs.group_mask, bool)[:, None]
    best, worst = best_index(scores, mask), worst_index(scores, mask)  # [NG]
    ordered = (jnp.sum(mask, axis=-1) >= 2) & (take(scores, best) > take(scores, worst))
    chosen, rejected = take(rewards, best), take(rewards, worst)  # [NG]
    count = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(mask, rewards, 0.0)) / count
    variance = jnp.sum(jnp.where(mask, (rewards - mean) ** 2, 0.0)) / count
    metrics = {
        "accuracy": _mean_over((chosen > rejected).astype(jnp.float32), ordered),
        "margin": _mean_over(chosen - rejected, ordered),
        "rewards/chosen": _mean_over(chosen, ordered),
        "rewards/rejected": _mean_over(rejected, ordered),
        "mean_reward": mean,
        "min_reward": jnp.min(jnp.where(mask, rewards, jnp.inf)),
        "max_reward": jnp.max(jnp.where(mask, rewards, -jnp.inf)),
        "std_reward": jnp.sqrt(variance),
    }
    if scores.shape[-1] > 2:
        metrics.update(_ranking_metrics(rewards, scores, mask))
    return metrics
