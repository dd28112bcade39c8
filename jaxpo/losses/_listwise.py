"""Listwise preference losses: K responses per prompt, ranked by labels.

The list is the **last axis**: ``policy_logps``, ``reference_logps``, ``labels`` and ``where``
are ``[..., K]`` (any leading shape) and every function returns the per-example loss ``[...]``.
``labels`` (ψ) are higher-is-better; ``where`` is the boolean mask of real entries (``None``:
all real). Masked entries change nothing, whatever values they hold: they are replaced before
any arithmetic (``jnp.where``, never a multiplication by the mask). A list with fewer than two
real entries has no preference in it and gives loss 0 with finite (zero) gradients.

Unless a method says otherwise the score of entry i is ``s_i = β(ℓ(y_i) − ℓ_ref(y_i))`` and
pairs are ordered pairs (i, j) of real entries with ``ψ_i > ψ_j``; tied labels form no pair.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxpo.losses._numerics import neg_log_sigmoid


def _mask_like(x: jax.Array, where: ArrayLike | None) -> jax.Array:
    """The boolean mask ``[..., K]`` of real entries (all True when ``where`` is None)."""
    if where is None:
        return jnp.ones(x.shape, bool)
    return jnp.broadcast_to(jnp.asarray(where, bool), x.shape)


def _scores(
    policy_logps: ArrayLike, reference_logps: ArrayLike, labels: ArrayLike, where, beta
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(s, ψ, mask)`` ``[..., K]`` with masked entries set to 0 in ``s`` and ``ψ``."""
    policy = jnp.asarray(policy_logps)
    reference = jnp.asarray(reference_logps)
    shape = jnp.broadcast_shapes(policy.shape, reference.shape, jnp.shape(labels))
    mask = _mask_like(jnp.zeros(shape), where)  # [..., K]
    # Zero masked entries before subtracting so garbage (even inf) never reaches a gradient.
    policy = jnp.where(mask, policy, 0.0)
    reference = jnp.where(mask, reference, 0.0)
    s = beta * (policy - reference)  # [..., K]
    psi = jnp.where(mask, jnp.asarray(labels, s.dtype), 0.0)  # [..., K]
    return s, psi, mask


def _pair_mask(psi: jax.Array, mask: jax.Array) -> jax.Array:
    """``[..., K, K]``: True for real (i, j) with ``ψ_i > ψ_j``."""
    both = mask[..., :, None] & mask[..., None, :]
    return both & (psi[..., :, None] > psi[..., None, :])


def masked_logsumexp(x: jax.Array, where: jax.Array, axis: int = -1) -> jax.Array:
    """``log Σ_{where} eˣ`` over ``axis``; 0 (zero gradient) where nothing is real."""
    x = jnp.where(where, x, -jnp.inf)
    peak = jnp.max(x, axis=axis, keepdims=True)
    peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
    terms = jnp.where(where, jnp.exp(jnp.where(where, x, peak) - peak), 0.0)
    total = jnp.sum(terms, axis=axis)
    nonempty = jnp.any(where, axis=axis)
    lse = jnp.log(jnp.where(nonempty, total, 1.0)) + jnp.squeeze(peak, axis)
    return jnp.where(nonempty, lse, 0.0)


def ranks(scores: ArrayLike, where: ArrayLike | None = None) -> jax.Array:
    """1-based descending ranks of the real entries, ties broken by position; no gradient.

    Args:
        scores: ``[..., K]``.
        where: boolean mask ``[..., K]`` of real entries; masked entries are not counted
            (their own rank is meaningless).

    Returns:
        Ranks ``[..., K]`` (float): the real entries hold a permutation of ``1..n``.

    >>> ranks(jnp.array([0.5, 2.0, 0.5, -1.0])).tolist()
    [2.0, 1.0, 3.0, 4.0]
    """
    s = jax.lax.stop_gradient(jnp.asarray(scores))
    mask = _mask_like(s, where)
    k = s.shape[-1]
    earlier = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]  # [K, K]: j < i
    above = (s[..., None, :] > s[..., :, None]) | (
        (s[..., None, :] == s[..., :, None]) & earlier
    )  # [..., K(i), K(j)]: j ranks above i
    return 1.0 + jnp.sum(above & mask[..., None, :], axis=-1).astype(s.dtype)


def lambda_weights(
    scores: ArrayLike, labels: ArrayLike, where: ArrayLike | None = None
) -> jax.Array:
    """LiPO-λ pair weights ``Δ_ij = |G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)|`` for pairs ψ_i > ψ_j.

    ``G = 2^ψ − 1``, ``D(τ) = log₂(1 + τ)``, τ the 1-based rank under ``scores`` (descending,
    masked entries excluded, no gradient). Non-pairs (ψ_i ≤ ψ_j or a masked entry) get 0.

    Args:
        scores: the current scores ``[..., K]`` that define the ranks.
        labels: ψ ``[..., K]`` (graded relevance, e.g. 0..10; ``2^ψ`` must fit the dtype).
        where: boolean mask ``[..., K]``.

    Returns:
        Weights ``[..., K, K]`` (row i, column j), no gradient.

    >>> w = lambda_weights(jnp.array([2.0, 1.0]), jnp.array([1.0, 0.0]))
    >>> round(float(w[0, 1]), 4), float(w[1, 0])  # 1·(1/log2(2) − 1/log2(3)); reverse pair 0
    (0.3691, 0.0)
    """
    s = jax.lax.stop_gradient(jnp.asarray(scores))
    mask = _mask_like(s, where)
    psi = jnp.where(mask, jax.lax.stop_gradient(jnp.asarray(labels, s.dtype)), 0.0)
    gain = jnp.exp2(psi) - 1.0  # [..., K]
    inv_discount = 1.0 / jnp.log2(1.0 + ranks(s, mask))  # [..., K]
    delta = jnp.abs(gain[..., :, None] - gain[..., None, :]) * jnp.abs(
        inv_discount[..., :, None] - inv_discount[..., None, :]
    )  # [..., K, K]
    return jnp.where(_pair_mask(psi, mask), delta, 0.0)


def lipo_lambda(
    policy_logps: ArrayLike,
    reference_logps: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    beta: float = 0.05,
) -> jax.Array:
    """LiPO-λ: pairwise logistic losses weighted by their LambdaRank ΔNDCG.

    ``loss = Σ_{i,j: ψ_i>ψ_j} Δ_ij · log(1 + e^{−(s_i − s_j)})`` with
    ``Δ_ij = |G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)|``, ``G = 2^ψ − 1``, ``D(τ) = log₂(1 + τ)`` and
    τ the 1-based rank of each real entry under the current scores ``s`` (descending, ties by
    position, no gradient through the ranks); see :func:`lambda_weights`.

    Args:
        policy_logps: policy log-probs ``[..., K]``.
        reference_logps: reference log-probs ``[..., K]``.
        labels: ψ ``[..., K]``, higher is better (graded relevance, e.g. 0..10).
        where: boolean mask ``[..., K]`` of real entries.
        beta: β of the implicit reward ``s = β(ℓ − ℓ_ref)``.

    Returns:
        Per-example loss ``[...]`` (a sum over pairs, not a mean).

    References:
        Liu et al., "LiPO: Listwise Preference Optimization through Learning-to-Rank", 2024,
        Eq. 8.

    >>> round(float(lipo_lambda(jnp.zeros(2), jnp.zeros(2), jnp.array([1.0, 0.0]))), 4)
    0.2558
    """
    s, psi, mask = _scores(policy_logps, reference_logps, labels, where, beta)
    weights = lambda_weights(s, psi, mask)  # [..., K, K]
    logistic = neg_log_sigmoid(s[..., :, None] - s[..., None, :])  # [..., K, K]
    return jnp.sum(jnp.where(weights > 0, weights * logistic, 0.0), axis=(-2, -1))


def pairwise_logistic(
    policy_logps: ArrayLike,
    reference_logps: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    beta: float = 0.1,
) -> jax.Array:
    """DPO over every labelled pair of the list (Bradley-Terry, "DPO_BT").

    ``loss = mean_{i,j: ψ_i>ψ_j} log(1 + e^{−(s_i − s_j)})``; 0 when the list has no pair.

    Args:
        policy_logps: policy log-probs ``[..., K]``.
        reference_logps: reference log-probs ``[..., K]``.
        labels: ψ ``[..., K]``, higher is better.
        where: boolean mask ``[..., K]`` of real entries.
        beta: β of the implicit reward.

    Returns:
        Per-example loss ``[...]``.

    References:
        Liu et al., "LiPO", 2024, Eq. 5; Rafailov et al., "DPO", 2023.

    >>> round(float(pairwise_logistic(jnp.zeros(3), jnp.zeros(3), jnp.array([2.0, 1.0, 0.0]))), 4)
    0.6931
    """
    s, psi, mask = _scores(policy_logps, reference_logps, labels, where, beta)
    pairs = _pair_mask(psi, mask)  # [..., K, K]
    logistic = neg_log_sigmoid(s[..., :, None] - s[..., None, :])  # [..., K, K]
    total = jnp.sum(jnp.where(pairs, logistic, 0.0), axis=(-2, -1))
    count = jnp.sum(pairs, axis=(-2, -1)).astype(total.dtype)
    return total / jnp.maximum(count, 1.0)


def list_mle(
    policy_logps: ArrayLike,
    reference_logps: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    beta: float = 0.1,
) -> jax.Array:
    """Plackett-Luce negative log-likelihood of the label order (ListMLE, "DPO_PL").

    ``loss = −Σ_k log( e^{s_τ(k)} / Σ_{j≥k} e^{s_τ(j)} )``, τ the order by labels (best first).
    Ties: entry k competes with itself and the entries labelled strictly lower,
    ``−Σ_k [s_k − logsumexp({s_k} ∪ {s_j : ψ_j < ψ_k})]``, which equals the formula above
    without ties and is invariant to the order of tied entries (ties carry no preference).

    Args:
        policy_logps: policy log-probs ``[..., K]``.
        reference_logps: reference log-probs ``[..., K]``.
        labels: ψ ``[..., K]``, higher is better.
        where: boolean mask ``[..., K]`` of real entries.
        beta: β of the implicit reward.

    Returns:
        Per-example loss ``[...]``.

    References:
        Xia et al., "Listwise approach to learning to rank" (ListMLE), ICML 2008;
        Liu et al., "LiPO", 2024, Eq. 7.

    >>> round(float(list_mle(jnp.zeros(3), jnp.zeros(3), jnp.array([2.0, 1.0, 0.0]))), 4)
    1.7918
    """
    s, psi, mask = _scores(policy_logps, reference_logps, labels, where, beta)
    k = s.shape[-1]
    competitors = _pair_mask(psi, mask) | (jnp.eye(k, dtype=bool) & mask[..., :, None])
    denominators = masked_logsumexp(
        jnp.broadcast_to(s[..., None, :], competitors.shape), competitors
    )  # [..., K]
    return -jnp.sum(jnp.where(mask, s - denominators, 0.0), axis=-1)


def listnet(
    policy_logps: ArrayLike,
    reference_logps: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    beta: float = 0.1,
) -> jax.Array:
    """ListNet: cross-entropy from the label distribution ψ/Σψ to softmax(s).

    ``loss = −Σ_k (ψ_k / Σ_j ψ_j) · log softmax(s)_k`` over the real entries. Labels must be
    non-negative; a list whose labels sum to 0 gives loss 0.

    Args:
        policy_logps: policy log-probs ``[..., K]``.
        reference_logps: reference log-probs ``[..., K]``.
        labels: ψ ``[..., K]``, non-negative, higher is better.
        where: boolean mask ``[..., K]`` of real entries.
        beta: β of the implicit reward.

    Returns:
        Per-example loss ``[...]``.

    References:
        Cao et al., "Learning to rank: from pairwise approach to listwise approach" (ListNet),
        ICML 2007; Liu et al., "LiPO", 2024, Eq. 11.

    >>> round(float(listnet(jnp.zeros(2), jnp.zeros(2), jnp.array([1.0, 0.0]))), 4)  # log 2
    0.6931
    """
    s, psi, mask = _scores(policy_logps, reference_logps, labels, where, beta)
    total = jnp.sum(psi, axis=-1, keepdims=True)  # [..., 1]
    target = jnp.where(total > 0, psi / jnp.where(total > 0, total, 1.0), 0.0)  # [..., K]
    log_softmax = s - masked_logsumexp(s, mask)[..., None]  # [..., K]
    return -jnp.sum(jnp.where(mask, target * log_softmax, 0.0), axis=-1)


def pro(
    policy_logps: ArrayLike,
    labels: ArrayLike,
    best_nll: ArrayLike,
    *,
    where: ArrayLike | None = None,
    sft_weight: float = 0.05,
) -> jax.Array:
    """Preference Ranking Optimization (PRO), reference-free, with its SFT term.

    ``s_k = ℓ̄(y_k)`` (per-token-mean log-probs, no β), ``r`` the reward labels. With the
    responses sorted best-first, for each k < n: ``T_k^i = r_k − r_i`` (i > k),
    ``T_k^k = max_{i>k} T_k^i``, ``L_k = logsumexp_{i≥k}(s_i·T_k^i) − s_k·T_k^k``;
    ``loss = Σ_k L_k + sft_weight · NLL(best)``. Ties: entry k's set ``i ≥ k`` is k itself
    and every other entry with ``r_i ≤ r_k`` (so a tie contributes ``e^0`` whatever its
    order), and ``L_k = 0`` for an entry with nothing strictly below it; without ties this is
    exactly the formula above.

    Args:
        policy_logps: per-token-mean policy log-probs ``ℓ̄`` ``[..., K]``.
        labels: reward scores r ``[..., K]``, higher is better.
        best_nll: token-mean NLL of the best response ``[...]`` (``−ℓ̄`` of the top entry).
        where: boolean mask ``[..., K]`` of real entries.
        sft_weight: weight of the SFT term (the paper's β).

    Returns:
        Per-example loss ``[...]``: 0 for an all-masked list; ``sft_weight·best_nll`` when
        the list has a single real entry.

    References:
        Song et al., "Preference Ranking Optimization for Human Alignment", AAAI 2024
        (arXiv 2306.17492).

    >>> round(float(pro(jnp.zeros(2), jnp.array([1.0, 0.0]), 1.0)), 4)  # log 2 + 0.05
    0.7431
    """
    s = jnp.asarray(policy_logps)
    mask = _mask_like(jnp.zeros(jnp.broadcast_shapes(s.shape, jnp.shape(labels))), where)
    s = jnp.where(mask, s, 0.0)  # [..., K]
    r = jnp.where(mask, jnp.asarray(labels, s.dtype), 0.0)  # [..., K]
    k = s.shape[-1]
    eye = jnp.eye(k, dtype=bool)
    lower = _pair_mask(r, mask)  # [..., K(k), K(i)]: r_i < r_k
    competitors = mask[..., :, None] & mask[..., None, :] & (r[..., None, :] <= r[..., :, None])
    gaps = r[..., :, None] - r[..., None, :]  # [..., K, K]: T_k^i = r_k − r_i
    top_gap = jnp.max(jnp.where(lower, gaps, 0.0), axis=-1)  # [...,K]: T_k^k
    temps = jnp.where(eye, top_gap[..., :, None], gaps)  # [..., K, K]
    logits = s[..., None, :] * temps  # [..., K, K]: s_i · T_k^i
    terms = masked_logsumexp(logits, competitors) - s * top_gap  # [..., K]
    ranking = jnp.sum(jnp.where(jnp.any(lower, axis=-1), terms, 0.0), axis=-1)
    nll = jnp.where(jnp.any(mask, axis=-1), jnp.asarray(best_nll, s.dtype), 0.0)
    return ranking + sft_weight * nll


def infonca(
    policy_logps: ArrayLike,
    reference_logps: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> jax.Array:
    """InfoNCA: cross-entropy from softmax(R/α) to the implicit-reward softmax.

    ``loss = −Σ_i softmax(R/α)_i · log softmax(β r)_i`` over the real entries,
    ``r = ℓ − ℓ_ref``, ``R`` the reward labels.

    Args:
        policy_logps: policy log-probs ``[..., K]``.
        reference_logps: reference log-probs ``[..., K]``.
        labels: reward labels R ``[..., K]``.
        where: boolean mask ``[..., K]`` of real entries.
        beta: β of the implicit reward.
        alpha: temperature α of the target distribution.

    Returns:
        Per-example loss ``[...]``.

    References:
        Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards",
        NeurIPS 2024.

    >>> round(float(infonca(jnp.zeros(2), jnp.zeros(2), jnp.array([1.0, 0.0]))), 4)  # log 2
    0.6931
    """
    s, rewards, mask = _scores(policy_logps, reference_logps, labels, where, beta)
    target_logits = rewards / alpha
    target = jnp.where(
        mask, jnp.exp(target_logits - masked_logsumexp(target_logits, mask)[..., None]), 0.0
    )  # [..., K]
    log_softmax = s - masked_logsumexp(s, mask)[..., None]  # [..., K]
    return -jnp.sum(jnp.where(mask, target * log_softmax, 0.0), axis=-1)
