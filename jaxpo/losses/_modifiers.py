"""Modifiers that wrap any pairwise loss: per-pair weights (WPO) and log-probs (LD-DPO).

Inputs are per-token arrays ``[..., T]`` (the response's tokens on the last axis) with boolean
masks of the real tokens; outputs are per-response quantities ``[...]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxpo.losses._numerics import check_hyperparameter, masked_count, masked_mean, masked_sum

# Physical inputs give mean_t[log p_t − log Σ_v p_v²] ≤ log V (V the vocabulary size), far
# below this cap; it only stops non-physical inputs from overflowing exp.
_WPO_MAX_LOG_WEIGHT = 50.0


def wpo_weights(
    token_logps: ArrayLike,
    token_log_sum_sq_probs: ArrayLike,
    *,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Weighted Preference Optimization weights of responses (off-policy correction).

    ``w(y) = exp(mean_t[log p_t − log Σ_v p_v²])`` over the real tokens, under stop-gradient:
    the response's probability under the policy, per token and normalised by the policy's own
    greedy-ness ``Σ_v p_v²``. The caller multiplies a pair's loss by ``w(y_w)·w(y_l)``.
    A zero-length (all-masked) response gets weight 1, which leaves its pair's loss unchanged.

    Args:
        token_logps: policy log-probs ``log p_t`` of the response tokens ``[..., T]``.
        token_log_sum_sq_probs: ``log Σ_v π_θ(v | x, y_<t)²`` at each position ``[..., T]``.
        where: boolean ``[..., T]``, True at real tokens; ``None`` means all are real.

    Returns:
        Weights ``[...]`` (> 0, no gradient).

    References:
        Zhou et al., "WPO: Enhancing RLHF with Weighted Preference Optimization", EMNLP 2024.

    >>> w = wpo_weights(jnp.log(jnp.array([0.5, 0.5])), jnp.log(jnp.array([0.5, 0.5])))
    >>> float(w)  # p_t = Σ_v p_v² (a uniform policy over two tokens): weight 1
    1.0
    """
    log_ratio = jnp.asarray(token_logps) - jnp.asarray(token_log_sum_sq_probs)  # [..., T]
    log_weight = masked_mean(log_ratio, where)  # [...]; 0 when all-masked
    weight = jnp.exp(jnp.minimum(log_weight, _WPO_MAX_LOG_WEIGHT))
    return jax.lax.stop_gradient(weight)


def ld_logps(
    chosen_token_logps: ArrayLike,
    rejected_token_logps: ArrayLike,
    *,
    chosen_mask: ArrayLike,
    rejected_mask: ArrayLike,
    alpha: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """Length-desensitised (LD-DPO) response log-probs of a pair.

    With the shared length ``l_p = min(|y_w|, |y_l|)`` (in real tokens):
    ``ℓ̂(y) = Σ_{t ≤ l_p} log p_t + α Σ_{t > l_p} log p_t``, i.e. the longer response's tail
    beyond the shorter one's length is scaled by α. Apply it to the policy's and the
    reference's token log-probs alike, then feed the results to ``dpo``.

    Args:
        chosen_token_logps: token log-probs of the chosen responses ``[..., Tw]``.
        rejected_token_logps: token log-probs of the rejected responses ``[..., Tl]``.
        chosen_mask: boolean ``[..., Tw]``, True at real chosen tokens (need not be contiguous).
        rejected_mask: boolean ``[..., Tl]``, True at real rejected tokens.
        alpha: α ∈ [0, 1], the weight of the tail; α = 1 gives the plain summed log-probs.

    Returns:
        ``(chosen, rejected)`` desensitised log-probs, each ``[...]``.

    References:
        Liu et al., "Length Desensitization in Directed Preference Optimization", 2024.

    >>> c, r = ld_logps(jnp.array([-1.0, -1.0, -1.0]), jnp.array([-2.0, 0.0, 0.0]),
    ...                 chosen_mask=jnp.array([True, True, True]),
    ...                 rejected_mask=jnp.array([True, False, False]))
    >>> float(c), float(r)  # chosen: −1 + 0.5·(−2)
    (-2.0, -2.0)
    """
    check_hyperparameter("ld_logps: alpha", alpha, low=0.0, high=1.0)
    chosen = jnp.asarray(chosen_token_logps)
    rejected = jnp.asarray(rejected_token_logps)
    shared = jnp.minimum(
        masked_count(chosen, chosen_mask), masked_count(rejected, rejected_mask)
    )  # [...]

    def desensitise(token_logps: jax.Array, mask: ArrayLike) -> jax.Array:
        mask = jnp.broadcast_to(mask, token_logps.shape)
        rank = jnp.cumsum(mask, axis=-1)  # [..., T], 1-based index among real tokens
        scale = jnp.where(rank <= shared[..., None], 1.0, alpha).astype(token_logps.dtype)
        real = jnp.where(mask, token_logps, jnp.zeros((), token_logps.dtype))  # [..., T]
        return masked_sum(scale * real, mask)  # [...]

    return desensitise(chosen, chosen_mask), desensitise(rejected, rejected_mask)
