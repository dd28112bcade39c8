"""Pairwise preference losses with a reference model.

Every function takes ``(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
reference_rejected_logps)``: response log-probabilities ``ℓ(y) = Σ_t log π(y_t | x, y_<t)``
as arrays of any common (broadcastable) leading shape ``[...]``, and returns the per-example
loss ``[...]``; the caller reduces. Notation: ``r_w = ℓ(y_w) − ℓ_ref(y_w)``,
``r_l = ℓ(y_l) − ℓ_ref(y_l)``, ``h = r_w − r_l``. The reference is not stop-gradiented here:
the trainer freezes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxpo.losses._numerics import check_hyperparameter, log_sigmoid, neg_log_sigmoid


def _log_ratios(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
) -> tuple[jax.Array, jax.Array]:
    """Returns ``(r_w, r_l)``, the policy/reference log-ratios of chosen and rejected."""
    chosen = jnp.asarray(policy_chosen_logps) - jnp.asarray(reference_chosen_logps)  # [...]
    rejected = jnp.asarray(policy_rejected_logps) - jnp.asarray(reference_rejected_logps)
    return chosen, rejected


def dpo(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Direct Preference Optimization, with optional label smoothing (conservative DPO).

    ``loss = −(1 − ε) log σ(βh) − ε log σ(−βh)``, ε = ``label_smoothing``.

    Args:
        policy_chosen_logps: policy log-probs of the chosen responses ``[...]``.
        policy_rejected_logps: policy log-probs of the rejected responses ``[...]``.
        reference_chosen_logps: reference log-probs of the chosen responses ``[...]``.
        reference_rejected_logps: reference log-probs of the rejected responses ``[...]``.
        beta: inverse temperature β of the implicit reward.
        label_smoothing: ε ∈ [0, 1], the assumed probability that a label is flipped (cDPO).

    Returns:
        Per-example loss ``[...]``.

    References:
        Rafailov et al., "Direct Preference Optimization", NeurIPS 2023;
        Mitchell, "A note on DPO with noisy preferences" (cDPO), 2023.

    >>> round(float(dpo(-10.0, -12.0, -11.0, -11.0)), 4)  # h = 2, −log σ(0.2)
    0.5981
    """
    check_hyperparameter("dpo: label_smoothing", label_smoothing, low=0.0, high=1.0)
    r_w, r_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (r_w - r_l)  # [...]
    return (1.0 - label_smoothing) * neg_log_sigmoid(z) + label_smoothing * neg_log_sigmoid(-z)


def robust_dpo(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    epsilon: float = 0.1,
) -> jax.Array:
    """Robust DPO (rDPO): an unbiased DPO loss under label-flip noise of rate ε.

    ``loss = [−(1 − ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε)``; it may be negative.

    Args:
        policy_chosen_logps: policy log-probs of the chosen responses ``[...]``.
        policy_rejected_logps: policy log-probs of the rejected responses ``[...]``.
        reference_chosen_logps: reference log-probs of the chosen responses ``[...]``.
        reference_rejected_logps: reference log-probs of the rejected responses ``[...]``.
        beta: inverse temperature β.
        epsilon: label-flip rate ε ∈ [0, 0.5); ε = 0 is plain DPO.

    Returns:
        Per-example loss ``[...]``.

    Raises:
        ValueError: if ``epsilon`` is not in [0, 0.5).

    References:
        Chowdhury et al., "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
        ICML 2024.

    >>> round(float(robust_dpo(-10.0, -12.0, -11.0, -11.0)), 4)
    0.5731
    """
    check_hyperparameter(
        "robust_dpo: epsilon", epsilon, low=0.0, high=0.5, high_inclusive=False
    )
    r_w, r_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (r_w - r_l)  # [...]
    return ((1.0 - epsilon) * neg_log_sigmoid(z) - epsilon * neg_log_sigmoid(-z)) / (
        1.0 - 2.0 * epsilon
    )


def ipo(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
) -> jax.Array:
    """Identity Preference Optimization: regress the log-ratio margin onto ``1/(2β)``.

    ``loss = (h − 1/(2β))²``. Expects **per-token-mean** log-probs ``ℓ̄(y) = ℓ(y)/|y|``.

    Args:
        policy_chosen_logps: policy per-token-mean log-probs of the chosen responses ``[...]``.
        policy_rejected_logps: the same for the rejected responses ``[...]``.
        reference_chosen_logps: reference per-token-mean log-probs, chosen ``[...]``.
        reference_rejected_logps: reference per-token-mean log-probs, rejected ``[...]``.
        beta: regularisation strength β (the target margin is ``1/(2β)``).

    Returns:
        Per-example loss ``[...]``.

    References:
        Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
        Preferences", AISTATS 2024.

    >>> float(ipo(-1.0, -2.0, -1.5, -1.5, beta=0.5))  # h = 1 = 1/(2β)
    0.0
    """
    r_w, r_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return jnp.square(r_w - r_l - 1.0 / (2.0 * beta))


def hinge(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
) -> jax.Array:
    """Hinge loss on the normalised likelihood margin (SLiC / RSO "hinge-norm").

    ``loss = max(0, 1 − βh)``.

    Args:
        policy_chosen_logps: policy log-probs of the chosen responses ``[...]``.
        policy_rejected_logps: policy log-probs of the rejected responses ``[...]``.
        reference_chosen_logps: reference log-probs of the chosen responses ``[...]``.
        reference_rejected_logps: reference log-probs of the rejected responses ``[...]``.
        beta: scale β of the margin (the margin is ``1/β``).

    Returns:
        Per-example loss ``[...]``.

    References:
        Zhao et al., "SLiC-HF", 2023; Liu et al., "Statistical Rejection Sampling Improves
        Preference Optimization" (RSO), ICLR 2024.

    >>> round(float(hinge(-10.0, -12.0, -11.0, -11.0)), 4)  # 1 − 0.1·2
    0.8
    """
    r_w, r_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return jax.nn.relu(1.0 - beta * (r_w - r_l))


def exo(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    epsilon: float = 1e-3,
) -> jax.Array:
    """Efficient Exact Optimization (EXO, pairwise): reverse KL to the smoothed label.

    ``loss = σ(βh)[log σ(βh) − log(1 − ε)] + σ(−βh)[log σ(−βh) − log ε]``, the KL divergence
    from the model's pair distribution ``(σ(βh), σ(−βh))`` to the label ``(1 − ε, ε)``.

    Args:
        policy_chosen_logps: policy log-probs of the chosen responses ``[...]``.
        policy_rejected_logps: policy log-probs of the rejected responses ``[...]``.
        reference_chosen_logps: reference log-probs of the chosen responses ``[...]``.
        reference_rejected_logps: reference log-probs of the rejected responses ``[...]``.
        beta: inverse temperature β.
        epsilon: label smoothing ε ∈ (0, 1) that keeps ``log ε`` finite.

    Returns:
        Per-example loss ``[...]`` (≥ 0).

    References:
        Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment",
        ICML 2024.

    >>> round(float(exo(-10.0, -10.0, -10.0, -10.0, epsilon=0.5)), 4)  # tie, ε = ½: KL = 0
    0.0
    """
    check_hyperparameter(
        "exo: epsilon", epsilon, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    r_w, r_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (r_w - r_l)  # [...]
    log_p, log_q = log_sigmoid(z), log_sigmoid(-z)  # [...]
    # σ(z)·log σ(z) → 0·(−|z|) for large |z|: a finite product, no inf·0.
    return jax.nn.sigmoid(z) * (log_p - jnp.log1p(-epsilon)) + jax.nn.sigmoid(-z) * (
        log_q - jnp.log(epsilon)
    )


def nca(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
) -> jax.Array:
    """Noise Contrastive Alignment (NCA), pairwise form.

    ``loss = −log σ(β r_w) − ½ log σ(−β r_w) − ½ log σ(−β r_l)``.

    Args:
        policy_chosen_logps: policy log-probs of the chosen responses ``[...]``.
        policy_rejected_logps: policy log-probs of the rejected responses ``[...]``.
        reference_chosen_logps: reference log-probs of the chosen responses ``[...]``.
        reference_rejected_logps: reference log-probs of the rejected responses ``[...]``.
        beta: inverse temperature β.

    Returns:
        Per-example loss ``[...]``.

    References:
        Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards",
        NeurIPS 2024.

    >>> round(float(nca(-10.0, -10.0, -10.0, -10.0)), 4)  # 2·log 2
    1.3863
    """
    r_w, r_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return (
        neg_log_sigmoid(beta * r_w)
        + 0.5 * neg_log_sigmoid(-beta * r_w)
        + 0.5 * neg_log_sigmoid(-beta * r_l)
    )


def bco(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    delta: ArrayLike = 0.0,
) -> jax.Array:
    """Binary Classifier Optimization (BCO), paired form.

    ``loss = −log σ(β r_w − δ) − log σ(−(β r_l − δ))``. The reward shift δ is the running mean
    of ``β r`` kept by the trainer and passed in; it is treated as a constant (stop-gradient).

    Args:
        policy_chosen_logps: policy log-probs of the chosen responses ``[...]``.
        policy_rejected_logps: policy log-probs of the rejected responses ``[...]``.
        reference_chosen_logps: reference log-probs of the chosen responses ``[...]``.
        reference_rejected_logps: reference log-probs of the rejected responses ``[...]``.
        beta: inverse temperature β.
        delta: reward shift δ, a scalar or an array broadcastable to ``[...]``.

    Returns:
        Per-example loss ``[...]``.

    References:
        Jung et al., "Binary Classifier Optimization for Large Language Model Alignment", 2024.

    >>> round(float(bco(-10.0, -10.0, -10.0, -10.0)), 4)  # 2·log 2
    1.3863
    """
    r_w, r_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    delta = jax.lax.stop_gradient(jnp.asarray(delta))
    return neg_log_sigmoid(beta * r_w - delta) + neg_log_sigmoid(-(beta * r_l - delta))


def sppo_hard(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    *,
    beta: float = 0.001,
) -> jax.Array:
    """Self-Play Preference Optimization with hard (0/1) win probabilities.

    ``loss = (r_w − 1/(2β))² + (r_l + 1/(2β))²``.

    Args:
        policy_chosen_logps: policy log-probs of the chosen responses ``[...]``.
        policy_rejected_logps: policy log-probs of the rejected responses ``[...]``.
        reference_chosen_logps: reference log-probs of the chosen responses ``[...]``.
        reference_rejected_logps: reference log-probs of the rejected responses ``[...]``.
        beta: β; the log-ratio targets are ``±1/(2β)``.

    Returns:
        Per-example loss ``[...]``.

    References:
        Wu et al., "Self-Play Preference Optimization for Language Model Alignment", 2024.

    >>> float(sppo_hard(-9.0, -13.0, -11.0, -11.0, beta=0.25))  # r_w = 2, r_l = −2
    0.0
    """
    r_w, r_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    target = 1.0 / (2.0 * beta)
    return jnp.square(r_w - target) + jnp.square(r_l + target)


def apo_zero(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
) -> jax.Array:
    """Anchored Preference Optimization, APO-zero: raise chosen, lower rejected likelihood.

    ``loss = (1 − σ(β r_w)) + σ(β r_l)``.

    Args:
        policy_chosen_logps: policy log-probs of the chosen responses ``[...]``.
        policy_rejected_logps: policy log-probs of the rejected responses ``[...]``.
        reference_chosen_logps: reference log-probs of the chosen responses ``[...]``.
        reference_rejected_logps: reference log-probs of the rejected responses ``[...]``.
        beta: inverse temperature β.

    Returns:
        Per-example loss ``[...]`` in [0, 2].

    References:
        D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions",
        2024.

    >>> float(apo_zero(-10.0, -10.0, -10.0, -10.0))
    1.0
    """
    r_w, r_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    # 1 − σ(x) = σ(−x), exact in floating point.
    return jax.nn.sigmoid(-beta * r_w) + jax.nn.sigmoid(beta * r_l)


def apo_down(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
) -> jax.Array:
    """Anchored Preference Optimization, APO-down: lower chosen, lower rejected more.

    ``loss = σ(β r_w) + (1 − σ(βh))``.

    Args:
        policy_chosen_logps: policy log-probs of the chosen responses ``[...]``.
        policy_rejected_logps: policy log-probs of the rejected responses ``[...]``.
        reference_chosen_logps: reference log-probs of the chosen responses ``[...]``.
        reference_rejected_logps: reference log-probs of the rejected responses ``[...]``.
        beta: inverse temperature β.

    Returns:
        Per-example loss ``[...]`` in [0, 2].

    References:
        D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions",
        2024.

    >>> float(apo_down(-10.0, -10.0, -10.0, -10.0))
    1.0
    """
    r_w, r_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return jax.nn.sigmoid(beta * r_w) + jax.nn.sigmoid(-beta * (r_w - r_l))


def dpop(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    lambda_: float = 50.0,
) -> jax.Array:
    """DPO-Positive (Smaug): DPO with a penalty when the chosen likelihood drops.

    ``loss = −log σ(β[h − λ·max(0, ℓ_ref(y_w) − ℓ(y_w))])``.

    Args:
        policy_chosen_logps: policy log-probs of the chosen responses ``[...]``.
        policy_rejected_logps: policy log-probs of the rejected responses ``[...]``.
        reference_chosen_logps: reference log-probs of the chosen responses ``[...]``.
        reference_rejected_logps: reference log-probs of the rejected responses ``[...]``.
        beta: inverse temperature β.
        lambda_: λ ≥ 0, weight of the chosen-likelihood penalty.

    Returns:
        Per-example loss ``[...]``.

    References:
        Pal et al., "Smaug: Fixing Failure Modes of Preference Optimisation with
        DPO-Positive", 2024.

    >>> round(float(dpop(-10.0, -12.0, -11.0, -11.0)), 4)  # r_w > 0: no penalty, = dpo
    0.5981
    """
    r_w, r_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    penalty = jax.nn.relu(-r_w)  # max(0, ℓ_ref(y_w) − ℓ(y_w)), [...]
    return neg_log_sigmoid(beta * (r_w - r_l - lambda_ * penalty))


def modpo(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    chosen_margin: ArrayLike,
    rejected_margin: ArrayLike,
    *,
    beta: float = 0.1,
    weight: float = 1.0,
) -> jax.Array:
    """Multi-Objective DPO (MODPO) for two objectives: the preference and a margin score.

    ``loss = −log σ((1/w)[βh − (1 − w)(m_w − m_l)])``.

    Reading: the policy is trained for the preference objective k with weight ``w = w_k`` and
    the remaining objectives' weight ``w₋ₖ = 1 − w``; ``m_w``/``m_l`` are those other
    objectives' (reward-model) scores of the chosen/rejected responses, already combined into
    one number per response. ``w = 1`` is DPO.

    Args:
        policy_chosen_logps: policy log-probs of the chosen responses ``[...]``.
        policy_rejected_logps: policy log-probs of the rejected responses ``[...]``.
        reference_chosen_logps: reference log-probs of the chosen responses ``[...]``.
        reference_rejected_logps: reference log-probs of the rejected responses ``[...]``.
        chosen_margin: the other objectives' score ``m_w`` of the chosen responses ``[...]``.
        rejected_margin: the other objectives' score ``m_l`` of the rejected responses ``[...]``.
        beta: inverse temperature β.
        weight: ``w_k ∈ (0, 1]``, the weight of the preference objective.

    Returns:
        Per-example loss ``[...]``.

    References:
        Zhou et al., "Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct
        Preference Optimization", Findings of ACL 2024.

    >>> round(float(modpo(-10.0, -12.0, -11.0, -11.0, 0.0, 0.0)), 4)  # w = 1: dpo
    0.5981
    """
    check_hyperparameter("modpo: weight", weight, low=0.0, high=1.0, low_inclusive=False)
    r_w, r_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    margin = jnp.asarray(chosen_margin) - jnp.asarray(rejected_margin)  # [...]
    return neg_log_sigmoid((beta * (r_w - r_l) - (1.0 - weight) * margin) / weight)
