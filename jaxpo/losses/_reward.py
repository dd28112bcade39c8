"""Reward-model objectives: pure functions of the scalar reward of each response.

A reward model gives response ``y`` of prompt ``x`` one number ``r(x, y)`` (the scalar head on
the decoder's final hidden state at the response's last token). These losses fit it to
preferences the way the log-prob objectives fit a policy: arrays in, per-example loss out.

- :func:`bradley_terry` — a pair, chosen and rejected: ``−log σ(r_c − r_r − m)``;
- :func:`plackett_luce` — a list of ``K`` responses on the **last axis**, ranked by labels
  (higher is better): the negative log-likelihood of that ranking under Plackett–Luce, which
  for ``K = 2`` is :func:`bradley_terry` without margin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxpo.losses._listwise import list_mle
from jaxpo.losses._numerics import neg_log_sigmoid


def bradley_terry(chosen_rewards: ArrayLike, rejected_rewards: ArrayLike, *,
                  margin: ArrayLike = 0.0, center_rewards_coefficient: float = 0.0
                  ) -> jax.Array:
    """Bradley–Terry negative log-likelihood of a preference, with an optional margin.

    ``loss = −log σ(r_c − r_r − m) + c·(r_c + r_r)²``: the probability that the chosen
    response wins is ``σ(r_c − r_r)``; a margin ``m > 0`` asks the reward gap to exceed ``m``
    (Llama 2's reward models take ``m`` from how strongly the annotator preferred the chosen
    response); ``c > 0`` pulls the rewards towards mean zero, which the preference alone leaves
    free (Eisenstein et al. 2023; TRL's ``center_rewards_coefficient``).

    Args:
        chosen_rewards: rewards of the chosen responses ``[...]``.
        rejected_rewards: rewards of the rejected responses ``[...]``.
        margin: the margin ``m``, a scalar or ``[...]`` (per pair).
        center_rewards_coefficient: ``c`` (0: no centering term).

    Returns:
        Per-example loss ``[...]``.

    References:
        Bradley & Terry, "Rank analysis of incomplete block designs", Biometrika 1952;
        Ouyang et al., "Training language models to follow instructions with human feedback",
        2022 (reward model loss); Touvron et al., "Llama 2", 2023, Eq. 2 (margin).

    >>> round(float(bradley_terry(jnp.array(1.0), jnp.array(0.0))), 4)
    0.3133
    >>> round(float(bradley_terry(jnp.array(1.0), jnp.array(0.0), margin=1.0)), 4)
    0.6931
    """
    chosen, rejected = jnp.asarray(chosen_rewards), jnp.asarray(rejected_rewards)
    loss = neg_log_sigmoid(chosen - rejected - margin)
    if isinstance(center_rewards_coefficient, (int, float)) and center_rewards_coefficient == 0:
        return loss
    return loss + center_rewards_coefficient * (chosen + rejected) ** 2


def plackett_luce(rewards: ArrayLike, labels: ArrayLike, *,
                  where: ArrayLike | None = None,
                  center_rewards_coefficient: float = 0.0) -> jax.Array:
    """Plackett–Luce negative log-likelihood of the label ranking of a list of rewards.

    ``loss = −Σ_k log( e^{r_τ(k)} / Σ_{j≥k} e^{r_τ(j)} )``, τ the order by labels (best
    first). Tied labels carry no preference: entry k competes with itself and the entries
    labelled strictly lower (:func:`jaxpo.losses.list_mle` with β = 1 and no reference). For
    ``K = 2`` and distinct labels it is ``bradley_terry(r_best, r_worst)``. A centering
    coefficient ``c`` adds ``c·(Σ_k r_k)²`` over the real entries (for two responses,
    :func:`bradley_terry`'s term).

    Args:
        rewards: rewards ``[..., K]``.
        labels: ψ ``[..., K]``, higher is better.
        where: boolean mask ``[..., K]`` of real entries (None: all real). A list with fewer
            than two real entries gives 0 (before centering).
        center_rewards_coefficient: ``c`` (0: no centering term).

    Returns:
        Per-example loss ``[...]``.

    References:
        Plackett, "The analysis of permutations", 1975; Luce, "Individual choice behavior",
        1959; Zhu, Jordan & Jiao, "Principled reinforcement learning with human feedback from
        pairwise or K-wise comparisons", ICML 2023 (the K-wise reward-model loss).

    >>> round(float(plackett_luce(jnp.zeros(3), jnp.array([2.0, 1.0, 0.0]))), 4)
    1.7918
    """
    rewards = jnp.asarray(rewards)
    loss = list_mle(rewards, jnp.zeros_like(rewards), labels, where=where, beta=1.0)
    if isinstance(center_rewards_coefficient, (int, float)) and center_rewards_coefficient == 0:
        return loss
    real = jnp.ones(rewards.shape, bool) if where is None else jnp.asarray(where, bool)
    total = jnp.sum(jnp.where(real, rewards, 0.0), axis=-1)
    return loss + center_rewards_coefficient * total ** 2
