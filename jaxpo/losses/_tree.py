"""Tree preference losses: a preference tree's root-to-leaf responses, scored step by step.

Axis layout: ``[..., K, M]`` — K responses (the tree's root-to-leaf paths) of M steps each
(a step is one tree node); ``[..., K]`` per-response labels and masks; the pairwise step
similarity is ``[..., K, K, M]``. The per-example loss has the leading shape ``[...]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxpo.losses._listwise import lambda_weights
from jaxpo.losses._numerics import neg_log_sigmoid


def tpo(
    policy_step_logps: ArrayLike,
    reference_step_logps: ArrayLike,
    labels: ArrayLike,
    *,
    step_where: ArrayLike | None = None,
    where: ArrayLike | None = None,
    step_similarity: ArrayLike | None = None,
    beta: float = 0.1,
) -> jax.Array:
    """Tree Preference Optimization: λ-weighted list ranking with the Adaptive Step Reward.

    The tree's complete responses form a ranked list trained with a LambdaLoss-style loss
    ("Preference List Ranking"); each step's part of a pair's reward margin is scaled by how
    different the two responses' steps are ("Adaptive Step Reward"), so shared or
    near-identical steps do not blur the margin. jaxpo's reading of the method (the paper's
    method section was not available and its released code contradicts itself)::

        ρ_{i,m} = β(ℓ_{i,m} − ℓ^ref_{i,m})                  step reward (real steps only)
        r_i     = Σ_m ρ_{i,m}                                response reward
        d_ij    = Σ_m (1 − S_{ij,m})·(ρ_{i,m} − ρ_{j,m})    adaptive margin (d_ij = r_i − r_j
                                                             when no similarity is given)
        loss    = Σ_{i,j: ψ_i > ψ_j} λ_ij · log(1 + e^{−d_ij})

    with λ_ij the LiPO-λ weights (:func:`jaxpo.losses.lipo_lambda`) from the labels ψ and the
    ranks of r (no gradient). A step that is the same tree node in both responses has equal
    ρ and S = 1, so it contributes nothing to d_ij. S is taken as 0 where step m is missing
    from either response, and is never differentiated (it is under stop-gradient). With
    K = 2, no similarity and labels [1, 0] the loss is λ·DPO, λ = 1 − 1/log₂3.

    Args:
        policy_step_logps: policy log-probs of each step ``[..., K, M]``.
        reference_step_logps: reference log-probs of each step ``[..., K, M]``.
        labels: ψ ``[..., K]``, higher is better (graded, e.g. 0..10).
        step_where: boolean mask ``[..., K, M]`` of real steps (``None``: all real).
        where: boolean mask ``[..., K]`` of real responses (``None``: all real).
        step_similarity: S ``[..., K, K, M]`` in [0, 1], the similarity of step m of response
            i and step m of response j (``None``: no adaptive weighting).
        beta: β of the implicit step reward.

    Returns:
        Per-example loss ``[...]``; 0 for a list with fewer than two real responses.

    References:
        Liao et al., "TPO: Aligning Large Language Models with Multi-branch & Multi-step
        Preference Trees", ICLR 2025 (arXiv 2410.12854).

    >>> pol = jnp.array([[-1.0, -2.0], [-1.0, -4.0]])  # two responses sharing step 0
    >>> ref = jnp.full((2, 2), -2.0)
    >>> round(float(tpo(pol, ref, jnp.array([1.0, 0.0]))), 4)  # λ·log(1 + e^{−0.2})
    0.2208
    """
    policy = jnp.asarray(policy_step_logps)
    reference = jnp.asarray(reference_step_logps)
    shape = jnp.broadcast_shapes(policy.shape, reference.shape)  # [..., K, M]
    response_mask = jnp.broadcast_to(
        jnp.ones((), bool) if where is None else jnp.asarray(where, bool), shape[:-1]
    )  # [..., K]
    step_mask = jnp.broadcast_to(
        jnp.ones((), bool) if step_where is None else jnp.asarray(step_where, bool), shape
    ) & response_mask[..., None]  # [..., K, M]
    # Zero masked steps before subtracting so their values never reach a gradient.
    rho = beta * (jnp.where(step_mask, policy, 0.0) - jnp.where(step_mask, reference, 0.0))
    rewards = jnp.sum(rho, axis=-1)  # [..., K]

    if step_similarity is None:
        margins = rewards[..., :, None] - rewards[..., None, :]  # [..., K, K]
    else:
        both = step_mask[..., :, None, :] & step_mask[..., None, :, :]  # [..., K, K, M]
        similarity = jax.lax.stop_gradient(jnp.asarray(step_similarity, rho.dtype))
        similarity = jnp.where(both, similarity, 0.0)
        step_gaps = rho[..., :, None, :] - rho[..., None, :, :]  # [..., K, K, M]
        margins = jnp.sum((1.0 - similarity) * step_gaps, axis=-1)  # [..., K, K]

    weights = lambda_weights(rewards, labels, response_mask)  # [..., K, K]
    return jnp.sum(jnp.where(weights > 0, weights * neg_log_sigmoid(margins), 0.0), axis=(-2, -1))
