"""Numerically stable building blocks shared by the loss functions.

Every loss in :mod:`jaxpo.losses` is written with these helpers so that no finite input
(log-probabilities of magnitude up to ~1e4 included) produces NaN or inf in the value or the
gradient:

- ``−log σ(z)`` is ``softplus(−z)`` and ``log σ(z)`` is ``−softplus(−z)``;
- ``log(1 − eˣ)`` is :func:`log1mexp`, which picks the accurate formula on each side of
  ``−log 2`` and keeps the branch that is not taken finite, so its gradient is never NaN;
- masked reductions use ``jnp.where`` (not a multiplication by the mask), so whatever sits in
  masked positions, even inf, changes neither the value nor the gradient.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

_LOG_2 = 0.6931471805599453


def log_sigmoid(z: ArrayLike) -> jax.Array:
    """Returns ``log σ(z)``, computed as ``−softplus(−z)``.

    Args:
        z: logits ``[...]``.

    Returns:
        ``log σ(z)`` ``[...]``, finite for every finite ``z``.

    >>> round(float(log_sigmoid(0.0)), 4)  # log(1/2)
    -0.6931
    """
    return -jax.nn.softplus(-jnp.asarray(z))


def neg_log_sigmoid(z: ArrayLike) -> jax.Array:
    """Returns ``−log σ(z)``, computed as ``softplus(−z)``; the logistic (Bradley-Terry) loss.

    Args:
        z: logits ``[...]``.

    Returns:
        ``−log σ(z)`` ``[...]``, finite and non-negative for every finite ``z``.

    >>> float(neg_log_sigmoid(-1e4))  # no overflow: ≈ 1e4
    10000.0
    """
    return jax.nn.softplus(-jnp.asarray(z))


def log1mexp(x: ArrayLike) -> jax.Array:
    """Returns ``log(1 − eˣ)`` for ``x < 0``, accurately over the whole range.

    Uses ``log(−expm1(x))`` for ``x > −log 2`` and ``log1p(−eˣ)`` otherwise (Mächler 2012).
    Each branch is evaluated on a safe stand-in where it is not selected, so the gradient is
    finite for every ``x < 0``. At ``x = 0`` the value is ``−inf`` (callers clamp first).

    Args:
        x: values ``[...]``, expected ``< 0`` (e.g. a log-probability).

    Returns:
        ``log(1 − eˣ)`` ``[...]``.

    References:
        Mächler, "Accurately Computing log(1 − exp(−|a|))", 2012.

    >>> round(float(log1mexp(-1e-3)), 4)  # ≈ log(1e-3)
    -6.9083
    """
    x = jnp.asarray(x)
    near_zero = x > -_LOG_2
    # Stand-in −1 lies on the other side of −log 2, where each formula is finite.
    x_near = jnp.where(near_zero, x, -1.0)
    x_far = jnp.where(near_zero, -1.0, x)
    return jnp.where(near_zero, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


def masked_sum(x: ArrayLike, where: ArrayLike | None = None, axis: int = -1) -> jax.Array:
    """Sums ``x`` over ``axis``, counting only entries where ``where`` is True.

    Args:
        x: values ``[..., T]``.
        where: boolean mask broadcastable to ``x``; ``None`` means every entry is real.
        axis: the axis to reduce.

    Returns:
        The masked sum ``[...]``; 0 where every entry is masked.

    >>> float(masked_sum(jnp.array([1.0, 2.0, jnp.inf]), jnp.array([True, True, False])))
    3.0
    """
    x = jnp.asarray(x)
    if where is not None:
        x = jnp.where(where, x, jnp.zeros((), x.dtype))
    return jnp.sum(x, axis=axis)


def masked_count(x: ArrayLike, where: ArrayLike | None = None, axis: int = -1) -> jax.Array:
    """Counts the real entries of ``x`` along ``axis`` (in ``x``'s float dtype).

    Args:
        x: values ``[..., T]`` (only the shape and dtype are used).
        where: boolean mask broadcastable to ``x``; ``None`` means every entry is real.
        axis: the axis to reduce.

    Returns:
        The number of real entries ``[...]``.
    """
    x = jnp.asarray(x)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    ones = jnp.ones(x.shape, dtype)
    return masked_sum(ones, where, axis=axis)


def masked_mean(x: ArrayLike, where: ArrayLike | None = None, axis: int = -1) -> jax.Array:
    """Averages ``x`` over ``axis``, counting only entries where ``where`` is True.

    Args:
        x: values ``[..., T]``.
        where: boolean mask broadcastable to ``x``; ``None`` means every entry is real.
        axis: the axis to reduce.

    Returns:
        The masked mean ``[...]``; 0 (with zero gradient) where every entry is masked.

    >>> float(masked_mean(jnp.array([1.0, 3.0, 7.0]), jnp.array([True, True, False])))
    2.0
    """
    total = masked_sum(x, where, axis=axis)
    count = masked_count(x, where, axis=axis)
    return total / jnp.maximum(count, 1.0)


def check_hyperparameter(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raises ``ValueError`` naming ``name`` when a concrete ``value`` is out of range.

    Traced values (under ``jit``) and arrays are not checked: their range is the caller's
    responsibility.

    Args:
        name: the hyperparameter's name, e.g. ``"robust_dpo: epsilon"``.
        value: the value to check.
        low: lower bound, or ``None``.
        high: upper bound, or ``None``.
        low_inclusive: whether ``value == low`` is allowed.
        high_inclusive: whether ``value == high`` is allowed.

    >>> check_hyperparameter("robust_dpo: epsilon", 0.5, low=0.0, high=0.5, high_inclusive=False)
    Traceback (most recent call last):
    ...
    ValueError: robust_dpo: epsilon must be in [0.0, 0.5), got 0.5
    """
    if not isinstance(value, numbers.Real):
        return
    v = float(value)
    too_low = low is not None and (v < low if low_inclusive else v <= low)
    too_high = high is not None and (v > high if high_inclusive else v >= high)
    if too_low or too_high:
        left = ("[" if low_inclusive else "(") + ("-inf" if low is None else str(low))
        right = ("inf" if high is None else str(high)) + ("]" if high_inclusive else ")")
        raise ValueError(f"{name} must be in {left}, {right}, got {value}")
