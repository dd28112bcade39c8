"""Token-level pairwise losses: they need per-token quantities, not only sequence sums.

Inputs are per-token arrays ``[..., T]`` (the response's tokens on the last axis, right- or
arbitrarily padded) with boolean masks ``chosen_mask`` / ``rejected_mask`` ``[..., T]`` of the
real tokens; chosen and rejected may have different ``T``. Masked positions change nothing,
whatever they hold. The outputs are per-example losses ``[...]``. Per-token KL terms
``KL(π_ref(·|x, y_<t) ‖ π_θ(·|x, y_<t))`` need the reference's full next-token distribution,
so the trainer computes them with an in-step reference and passes them in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxpo.losses._numerics import masked_sum, neg_log_sigmoid


def _check_token_shapes(fn: str, mask_name: str, mask: ArrayLike, **arrays: ArrayLike) -> None:
    """Raises ``ValueError`` naming the field when a token array's shape differs from its mask's."""
    mask_shape = jnp.shape(mask)
    for name, array in arrays.items():
        if jnp.shape(array) != mask_shape:
            raise ValueError(
                f"{fn}: {name} has shape {jnp.shape(array)} but {mask_name} has shape "
                f"{mask_shape}; per-token arrays must match their mask [..., T]"
            )


def _zero_padding(x: ArrayLike, mask: ArrayLike) -> jax.Array:
    """Returns ``x`` with 0 at the masked positions, whatever they held."""
    x = jnp.asarray(x)
    return jnp.where(mask, x, jnp.zeros((), x.dtype))


def tdpo(
    policy_chosen_token_logps: ArrayLike,
    policy_rejected_token_logps: ArrayLike,
    reference_chosen_token_logps: ArrayLike,
    reference_rejected_token_logps: ArrayLike,
    chosen_token_kl: ArrayLike,
    rejected_token_kl: ArrayLike,
    *,
    chosen_mask: ArrayLike,
    rejected_mask: ArrayLike,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: int = 2,
) -> jax.Array:
    """Token-level Direct Preference Optimization (TDPO1 / TDPO2).

    With ``h = Σ_t (log π_θ − log π_ref)(y_w,t) − Σ_t (log π_θ − log π_ref)(y_l,t)`` and
    ``SeqKL(y) = Σ_t KL(π_ref(·|x, y_<t) ‖ π_θ(·|x, y_<t))`` over real tokens:

    - TDPO1: ``−log σ(βh − β(SeqKL_l − SeqKL_w))``;
    - TDPO2: ``−log σ(βh − αβ(SeqKL_l − sg(SeqKL_w)))``, ``sg`` = stop-gradient.

    Args:
        policy_chosen_token_logps: policy token log-probs of the chosen responses ``[..., Tw]``.
        policy_rejected_token_logps: policy token log-probs of the rejected ``[..., Tl]``.
        reference_chosen_token_logps: reference token log-probs, chosen ``[..., Tw]``.
        reference_rejected_token_logps: reference token log-probs, rejected ``[..., Tl]``.
        chosen_token_kl: per-token ``KL(π_ref ‖ π_θ)`` along the chosen responses ``[..., Tw]``.
        rejected_token_kl: per-token ``KL(π_ref ‖ π_θ)`` along the rejected ``[..., Tl]``.
        chosen_mask: boolean ``[..., Tw]``, True at real chosen tokens.
        rejected_mask: boolean ``[..., Tl]``, True at real rejected tokens.
        beta: inverse temperature β.
        alpha: α, weight of the sequential KL term in TDPO2 (unused by TDPO1).
        variant: 1 (TDPO1) or 2 (TDPO2).

    Returns:
        Per-example loss ``[...]``.

    Raises:
        ValueError: on an unknown ``variant`` or a token array whose shape differs from its
            mask's.

    References:
        Zeng et al., "Token-level Direct Preference Optimization", ICML 2024.

    >>> m = jnp.array([True, True, False])
    >>> t = jnp.array([-1.0, -2.0, 0.0])
    >>> loss = tdpo(t, t, t, t, jnp.zeros(3), jnp.zeros(3), chosen_mask=m, rejected_mask=m)
    >>> round(float(loss), 4)  # h = 0, no KL: log 2
    0.6931
    """
    if variant not in (1, 2):
        raise ValueError(f"tdpo: variant must be 1 or 2, got {variant!r}")
    _check_token_shapes(
        "tdpo", "chosen_mask", chosen_mask,
        policy_chosen_token_logps=policy_chosen_token_logps,
        reference_chosen_token_logps=reference_chosen_token_logps,
        chosen_token_kl=chosen_token_kl,
    )  # fmt: skip
    _check_token_shapes(
        "tdpo", "rejected_mask", rejected_mask,
        policy_rejected_token_logps=policy_rejected_token_logps,
        reference_rejected_token_logps=reference_rejected_token_logps,
        rejected_token_kl=rejected_token_kl,
    )  # fmt: skip
    chosen_ratio = jnp.asarray(policy_chosen_token_logps) - jnp.asarray(
        reference_chosen_token_logps
    )  # [..., Tw]
    rejected_ratio = jnp.asarray(policy_rejected_token_logps) - jnp.asarray(
        reference_rejected_token_logps
    )  # [..., Tl]
    h = masked_sum(chosen_ratio, chosen_mask) - masked_sum(rejected_ratio, rejected_mask)  # [...]
    seq_kl_w = masked_sum(chosen_token_kl, chosen_mask)  # [...]
    seq_kl_l = masked_sum(rejected_token_kl, rejected_mask)  # [...]
    if variant == 1:
        kl_term = beta * (seq_kl_l - seq_kl_w)
    else:
        kl_term = alpha * beta * (seq_kl_l - jax.lax.stop_gradient(seq_kl_w))
    return neg_log_sigmoid(beta * h - kl_term)


def sparse_po(
    policy_chosen_token_logps: ArrayLike,
    policy_rejected_token_logps: ArrayLike,
    reference_chosen_token_logps: ArrayLike,
    reference_rejected_token_logps: ArrayLike,
    chosen_token_kl: ArrayLike,
    rejected_token_kl: ArrayLike,
    chosen_weights: ArrayLike,
    rejected_weights: ArrayLike,
    *,
    chosen_mask: ArrayLike,
    rejected_mask: ArrayLike,
    beta: float = 0.1,
    mask_l1: float = 0.001,
) -> jax.Array:
    """Sparse Preference Optimization: token-weighted rewards and KL terms.

    With per-token log-ratios ``r_t = log π_θ(y_t|…) − log π_ref(y_t|…)``, per-token
    ``KL_t = KL(π_ref ‖ π_θ)`` and token weights ``m`` (the sparse masks), sums over real
    tokens only:

    - ``u = Σ_t m_w,t r_w,t − Σ_t m_l,t r_l,t``;
    - ``d = Σ_t m_l,t KL_l,t − Σ_t m_w,t KL_w,t``;
    - ``loss = −log σ(β(u − d)) + λ‖m‖₁``, ``‖m‖₁ = Σ_t |m_w,t| + Σ_t |m_l,t|``, λ = ``mask_l1``.

    Args:
        policy_chosen_token_logps: policy token log-probs of the chosen responses ``[..., Tw]``.
        policy_rejected_token_logps: policy token log-probs of the rejected ``[..., Tl]``.
        reference_chosen_token_logps: reference token log-probs, chosen ``[..., Tw]``.
        reference_rejected_token_logps: reference token log-probs, rejected ``[..., Tl]``.
        chosen_token_kl: per-token ``KL(π_ref ‖ π_θ)`` along the chosen responses ``[..., Tw]``.
        rejected_token_kl: per-token ``KL(π_ref ‖ π_θ)`` along the rejected ``[..., Tl]``.
        chosen_weights: token weights ``m_w`` ``[..., Tw]`` (given, or produced by a mask head).
        rejected_weights: token weights ``m_l`` ``[..., Tl]``.
        chosen_mask: boolean ``[..., Tw]``, True at real chosen tokens.
        rejected_mask: boolean ``[..., Tl]``, True at real rejected tokens.
        beta: inverse temperature β.
        mask_l1: λ, the L1 penalty on the token weights (sparsity).

    Returns:
        Per-example loss ``[...]``.

    Raises:
        ValueError: on a token array whose shape differs from its mask's.

    References:
        Christopoulou et al., "SparsePO: Controlling Preference Alignment of LLMs via Sparse
        Token Masks", 2024.

    >>> m = jnp.array([True, True, False])
    >>> t, z = jnp.array([-1.0, -2.0, 0.0]), jnp.zeros(3)
    >>> w = jnp.array([0.5, 0.5, 9.0])  # the masked weight is ignored
    >>> loss = sparse_po(t, t, t, t, z, z, w, w, chosen_mask=m, rejected_mask=m)
    >>> round(float(loss), 4)  # log 2 + 0.001·2
    0.6951
    """
    _check_token_shapes(
        "sparse_po", "chosen_mask", chosen_mask,
        policy_chosen_token_logps=policy_chosen_token_logps,
        reference_chosen_token_logps=reference_chosen_token_logps,
        chosen_token_kl=chosen_token_kl, chosen_weights=chosen_weights,
    )  # fmt: skip
    _check_token_shapes(
        "sparse_po", "rejected_mask", rejected_mask,
        policy_rejected_token_logps=policy_rejected_token_logps,
        reference_rejected_token_logps=reference_rejected_token_logps,
        rejected_token_kl=rejected_token_kl, rejected_weights=rejected_weights,
    )  # fmt: skip
    # Zero the padding first: a product with padding (even inf) must not reach the gradient.
    real = _zero_padding
    m_w = real(chosen_weights, chosen_mask)  # [..., Tw]
    m_l = real(rejected_weights, rejected_mask)  # [..., Tl]
    r_w = real(policy_chosen_token_logps, chosen_mask) - real(
        reference_chosen_token_logps, chosen_mask
    )  # [..., Tw]
    r_l = real(policy_rejected_token_logps, rejected_mask) - real(
        reference_rejected_token_logps, rejected_mask
    )  # [..., Tl]
    kl_w = real(chosen_token_kl, chosen_mask)  # [..., Tw]
    kl_l = real(rejected_token_kl, rejected_mask)  # [..., Tl]
    u = jnp.sum(m_w * r_w, axis=-1) - jnp.sum(m_l * r_l, axis=-1)  # [...]
    d = jnp.sum(m_l * kl_l, axis=-1) - jnp.sum(m_w * kl_w, axis=-1)  # [...]
    l1 = jnp.sum(jnp.abs(m_w), axis=-1) + jnp.sum(jnp.abs(m_l), axis=-1)  # [...]
    return neg_log_sigmoid(beta * (u - d)) + mask_l1 * l1
