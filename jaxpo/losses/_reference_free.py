"""Pairwise preference losses without a reference model.

Every function takes ``(policy_chosen_logps, policy_rejected_logps, ...)`` of any common
(broadcastable) leading shape ``[...]`` and returns the per-example loss ``[...]``. Whether a
method expects summed log-probs ``ℓ(y) = Σ_t log π(y_t | …)`` or per-token-mean log-probs
``ℓ̄(y) = ℓ(y)/|y|`` is stated in its docstring (SimPO and ORPO: means; CPO, TPO: sums).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxpo.losses._numerics import log1mexp, neg_log_sigmoid

# ORPO takes log(1 − p) of a mean log-prob; p = 1 (ℓ̄ = 0) would give log 0. Clamping ℓ̄ to at
# most −1e-6 bounds log(1 − p) below by ≈ −13.8 and its gradient by ≈ 1e6.
_ORPO_MAX_MEAN_LOGP = -1e-6


def simpo(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> jax.Array:
    """Simple Preference Optimization: length-normalised reward with a target margin.

    ``loss = −log σ(β(ℓ̄_w − ℓ̄_l) − γ)``. Expects **per-token-mean** log-probs.

    Args:
        policy_chosen_logps: per-token-mean log-probs ``ℓ̄_w`` of the chosen responses ``[...]``.
        policy_rejected_logps: per-token-mean log-probs ``ℓ̄_l`` of the rejected ``[...]``.
        beta: reward scale β.
        gamma: target reward margin γ.

    Returns:
        Per-example loss ``[...]``.

    References:
        Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward",
        NeurIPS 2024.

    >>> round(float(simpo(-1.0, -1.25)), 4)  # β·0.25 − γ = 0: log 2
    0.6931
    """
    margin = jnp.asarray(policy_chosen_logps) - jnp.asarray(policy_rejected_logps)  # [...]
    return neg_log_sigmoid(beta * margin - gamma)


def orpo(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    chosen_nll: ArrayLike,
    *,
    alpha: float = 0.1,
) -> jax.Array:
    """Odds Ratio Preference Optimization: SFT plus a log-odds-ratio preference term.

    ``loss = NLL_w − α log σ(log odds(y_w) − log odds(y_l))`` with
    ``log odds(y) = ℓ̄(y) − log(1 − e^{ℓ̄(y)})``. Expects **per-token-mean** log-probs (always
    < 0); inside ``log(1 − e^{ℓ̄})`` (a stable log1mexp) ℓ̄ is clamped to at most −1e-6 so that a
    mean log-prob of 0 gives finite values and gradients.

    Args:
        policy_chosen_logps: per-token-mean log-probs ``ℓ̄_w`` of the chosen responses ``[...]``.
        policy_rejected_logps: per-token-mean log-probs ``ℓ̄_l`` of the rejected ``[...]``.
        chosen_nll: the SFT loss ``NLL_w`` of the chosen responses ``[...]`` (e.g. ``sft``).
        alpha: weight α (the paper's λ) of the odds-ratio term.

    Returns:
        Per-example loss ``[...]``.

    References:
        Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model",
        EMNLP 2024.

    >>> round(float(orpo(-0.5, -0.5, 0.5)), 4)  # equal odds: 0.5 + 0.1·log 2
    0.5693
    """
    mean_w = jnp.asarray(policy_chosen_logps)  # [...]
    mean_l = jnp.asarray(policy_rejected_logps)  # [...]
    log1m_w = log1mexp(jnp.minimum(mean_w, _ORPO_MAX_MEAN_LOGP))  # log(1 − p_w)
    log1m_l = log1mexp(jnp.minimum(mean_l, _ORPO_MAX_MEAN_LOGP))  # log(1 − p_l)
    log_odds_ratio = (mean_w - mean_l) - (log1m_w - log1m_l)  # [...]
    return jnp.asarray(chosen_nll) + alpha * neg_log_sigmoid(log_odds_ratio)


def cpo(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    chosen_nll: ArrayLike,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> jax.Array:
    """Contrastive Preference Optimization: reference-free DPO plus SFT on the chosen.

    ``loss = −log σ(β(ℓ_w − ℓ_l)) + α·NLL_w``. Expects **summed** log-probs.

    Args:
        policy_chosen_logps: summed log-probs ``ℓ_w`` of the chosen responses ``[...]``.
        policy_rejected_logps: summed log-probs ``ℓ_l`` of the rejected responses ``[...]``.
        chosen_nll: the SFT loss ``NLL_w`` of the chosen responses ``[...]``.
        beta: inverse temperature β.
        alpha: weight α of the SFT term.

    Returns:
        Per-example loss ``[...]``.

    References:
        Xu et al., "Contrastive Preference Optimization: Pushing the Boundaries of LLM
        Performance in Machine Translation", ICML 2024.

    >>> round(float(cpo(-10.0, -10.0, 1.0)), 4)  # log 2 + 1
    1.6931
    """
    margin = jnp.asarray(policy_chosen_logps) - jnp.asarray(policy_rejected_logps)  # [...]
    return neg_log_sigmoid(beta * margin) + alpha * jnp.asarray(chosen_nll)


def triple_po(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    gold_nll: ArrayLike,
    *,
    beta: float = 0.01,
    alpha: float = 1.0,
) -> jax.Array:
    """Triple Preference Optimization: preference term plus SFT on a gold response.

    ``loss = −log σ(β(ℓ_w − ℓ_l)) + α·NLL_gold``. Expects **summed** log-probs (pass
    per-token means for the length-normalised variant).

    Args:
        policy_chosen_logps: summed log-probs ``ℓ_w`` of the preferred responses ``[...]``.
        policy_rejected_logps: summed log-probs ``ℓ_l`` of the rejected responses ``[...]``.
        gold_nll: the SFT loss ``NLL_gold`` of the gold (reference) responses ``[...]``.
        beta: inverse temperature β.
        alpha: weight α of the SFT term.

    Returns:
        Per-example loss ``[...]``.

    References:
        Saeidi et al., "Triple Preference Optimization: Achieving Better Alignment using a
        Single Step Optimization", 2024.

    >>> round(float(triple_po(-10.0, -10.0, 1.0)), 4)  # log 2 + 1
    1.6931
    """
    margin = jnp.asarray(policy_chosen_logps) - jnp.asarray(policy_rejected_logps)  # [...]
    return neg_log_sigmoid(beta * margin) + alpha * jnp.asarray(gold_nll)
