"""Auxiliary objectives that combine with any preference loss by weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def sft(policy_logps: ArrayLike, num_tokens: ArrayLike) -> jax.Array:
    """Supervised fine-tuning loss: the token-mean negative log-likelihood of a response.

    ``loss = −ℓ(y) / max(|y|, 1)``. Weighted with ``dpo`` it gives RPO (DPO + NLL); pass the
    chosen (or best) response. A zero-length response gives 0 rather than a division by zero.

    Args:
        policy_logps: summed policy log-probs ``ℓ(y)`` ``[...]``.
        num_tokens: number of response tokens ``|y|`` ``[...]`` (int or float).

    Returns:
        Per-example loss ``[...]``.

    References:
        Pang et al., "Iterative Reasoning Preference Optimization" (RPO), NeurIPS 2024.

    >>> float(sft(jnp.array(-6.0), jnp.array(3)))
    2.0
    """
    logps = jnp.asarray(policy_logps)
    dtype = logps.dtype if jnp.issubdtype(logps.dtype, jnp.floating) else jnp.float32
    count = jnp.maximum(jnp.asarray(num_tokens).astype(dtype), 1.0)
    return -logps / count
