"""Unpaired preference losses: each example is one response labelled desirable or not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def kto(
    policy_logps: ArrayLike,
    reference_logps: ArrayLike,
    desirable: ArrayLike,
    kl: ArrayLike,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> jax.Array:
    """Kahneman-Tversky Optimization on unpaired desirable/undesirable responses.

    With ``r = ℓ(y) − ℓ_ref(y)`` and the reference point ``z0 = max(0, kl)``:

    - desirable: ``λ_D (1 − σ(β(r − z0)))``;
    - undesirable: ``λ_U (1 − σ(β(z0 − r)))``.

    ``kl`` is the batch estimate of ``KL(π_θ ‖ π_ref)`` (mismatched completions), computed by
    the trainer; it is a constant here (stop-gradient) and clamped at 0 as in the paper.

    Args:
        policy_logps: policy log-probs ``ℓ(y)`` of the responses ``[...]``.
        reference_logps: reference log-probs ``ℓ_ref(y)`` ``[...]``.
        desirable: boolean ``[...]``, True for desirable responses.
        kl: the reference point estimate, a scalar or broadcastable to ``[...]``.
        beta: inverse temperature β.
        desirable_weight: λ_D.
        undesirable_weight: λ_U.

    Returns:
        Per-example loss ``[...]``.

    References:
        Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization",
        ICML 2024.

    >>> loss = kto(jnp.array([-10.0, -10.0]), jnp.array([-10.0, -10.0]),
    ...            jnp.array([True, False]), 0.0)
    >>> [round(float(v), 4) for v in loss]
    [0.5, 0.5]
    """
    log_ratio = jnp.asarray(policy_logps) - jnp.asarray(reference_logps)  # [...]
    z0 = jnp.maximum(jax.lax.stop_gradient(jnp.asarray(kl)), 0.0)
    # 1 − σ(x) = σ(−x), exact in floating point.
    desirable_loss = desirable_weight * jax.nn.sigmoid(-beta * (log_ratio - z0))
    undesirable_loss = undesirable_weight * jax.nn.sigmoid(-beta * (z0 - log_ratio))
    return jnp.where(jnp.asarray(desirable, bool), desirable_loss, undesirable_loss)
