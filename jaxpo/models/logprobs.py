"""Per-token log-probabilities without the ``[B, S, V]`` logits, and their node/response sums.

Axis layout: ``B`` (or ``R``) rows, ``S`` row length, ``D`` model width, ``V`` vocabulary,
``N`` node slots per row, ``NG`` group slots, ``K`` responses per group, ``M`` steps per response.

The decoder returns hidden states ``[B, S, D]`` (after the final norm). A scored token at
position ``q`` is predicted by the output at ``pred_index[q]`` (−1 = not scored). We gather the
hidden state at ``pred_index``, then walk the sequence in chunks of ``chunk_size`` positions:
each chunk is projected to the vocabulary (``[B, chunk, V]``, fp32), reduced with a logsumexp,
and the token's logit is picked. The chunk body runs under ``jax.checkpoint`` inside a
``lax.scan``, so the backward pass recomputes one chunk's logits at a time: peak memory is
``O(B · chunk · V)`` instead of ``O(B · S · V)``. The softmax is fp32 whatever the input dtype.

The same pass can return what token-level objectives need: entropy ``H(π_θ)``, ``log Σ_v p_v²``
(WPO's weights) and ``KL(π_ref ‖ π_θ)`` (TDPO, SparsePO) given the reference's hidden states
and unembedding, which are held under ``stop_gradient``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxpo.sharding.logical import constrain, shards

# Sequence positions per chunk. Tuned with benchmarks/logprob_memory.py (V = 128k, S = 2048).
DEFAULT_CHUNK_SIZE = 256


def token_logps(
    hidden: ArrayLike,
    unembedding: ArrayLike,
    tokens: ArrayLike,
    pred_index: ArrayLike,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Log-probability of each scored token, ``log π(tokens[b, q] | hidden[b, pred_index[b, q]])``.

    Args:
        hidden: hidden states ``[B, S, D]`` (any float dtype).
        unembedding: output projection ``[V, D]``; logits are ``hidden @ unembedding.T``.
        tokens: token ids ``[B, S]``.
        pred_index: ``[B, S]`` position whose output predicts each token, −1 = unscored.
        chunk_size: sequence positions projected to the vocabulary at once.

    Returns:
        ``[B, S]`` float32 log-probabilities, 0 where ``pred_index < 0``.

    >>> h = jnp.zeros((1, 3, 4)); w = jnp.zeros((8, 4))  # uniform over 8 tokens
    >>> lp = token_logps(h, w, jnp.array([[5, 1, 2]]), jnp.array([[-1, 0, 1]]), chunk_size=2)
    >>> [[round(float(x), 4) for x in row] for row in lp]  # log(1/8) where scored
    [[0.0, -2.0794, -2.0794]]
    """
    stats = token_stats(hidden, unembedding, tokens, pred_index, chunk_size=chunk_size)
    return stats["logps"]


def token_stats(
    hidden: ArrayLike,
    unembedding: ArrayLike,
    tokens: ArrayLike,
    pred_index: ArrayLike,
    *,
    ref_hidden: ArrayLike | None = None,
    ref_unembedding: ArrayLike | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
    with_sq: bool = False,
) -> dict[str, jax.Array]:
    """Per-token log-probs and, from the same chunked pass, token-level extras.

    With ``p = softmax(hidden[pred_index] @ unembedding.T)`` at each scored position:
    ``logps = log p[token]``; ``entropy = −Σ_v p_v log p_v``; ``log_sq = log Σ_v p_v²``;
    with the reference's ``q`` (same positions and tokens), ``ref_logps = log q[token]`` and
    ``kl = Σ_v q_v (log q_v − log p_v)`` = KL(π_ref ‖ π_θ). The reference side is under
    ``stop_gradient``: gradients flow only into ``hidden`` and ``unembedding``.

    Args:
        hidden: policy hidden states ``[B, S, D]``.
        unembedding: policy output projection ``[V, D]``.
        tokens: token ids ``[B, S]``.
        pred_index: ``[B, S]`` predicting position, −1 = unscored.
        ref_hidden: reference hidden states ``[B, S, D]`` (with ``ref_unembedding``) or None.
        ref_unembedding: reference output projection ``[V, D]`` or None.
        chunk_size: sequence positions projected to the vocabulary at once.
        with_entropy: also return ``entropy``.
        with_sq: also return ``log_sq``.

    Returns:
        dict of ``[B, S]`` float32 arrays, 0 where ``pred_index < 0``: ``logps`` always;
        ``entropy`` and ``log_sq`` when asked; ``ref_logps`` and ``kl`` when the reference
        is given.

    >>> h = jnp.zeros((1, 2, 4)); w = jnp.zeros((8, 4))
    >>> out = token_stats(h, w, jnp.array([[0, 3]]), jnp.array([[-1, 0]]), with_entropy=True)
    >>> round(float(out["entropy"][0, 1]), 4), float(out["entropy"][0, 0])  # log 8, unscored
    (2.0794, 0.0)
    """
    hidden = jnp.asarray(hidden)
    unembedding = jnp.asarray(unembedding)
    tokens = jnp.asarray(tokens, jnp.int32)
    pred_index = jnp.asarray(pred_index, jnp.int32)
    _check_shapes(hidden, unembedding, tokens, pred_index, chunk_size)
    with_ref = ref_hidden is not None or ref_unembedding is not None
    if with_ref:
        if ref_hidden is None or ref_unembedding is None:
            raise ValueError("token_stats: pass both ref_hidden and ref_unembedding, or neither")
        ref_hidden = jax.lax.stop_gradient(jnp.asarray(ref_hidden))  # Reference is frozen.
        ref_unembedding = jax.lax.stop_gradient(jnp.asarray(ref_unembedding))
        _check_shapes(ref_hidden, ref_unembedding, tokens, pred_index, chunk_size, "ref_")

    batch, length = tokens.shape
    chunk_size = min(chunk_size, max(length, 1))  # no padding beyond one short row
    valid = pred_index >= 0  # [B, S]
    num_chunks = -(-length // chunk_size)
    padded = num_chunks * chunk_size

    # Under sharding rules the rows are split P ways over the batch's mesh axes. The chunks
    # carry that split as an explicit leading axis [C, P, B/P, chunk, ...], and the
    # unembedding is broadcast to one copy per batch shard [P, V, D] (gathered over its embed
    # axis once here, not once per chunk). Each shard's unembedding gradient then accumulates
    # locally across the chunks of the backward loop, and the transpose of the broadcast sums
    # the P partial gradients once, after the loop: one reduction of the [V, D] gradient per
    # step instead of one per chunk.
    parts = shards("batch", batch)

    def to_chunks(x: jax.Array) -> jax.Array:
        # [B, S, ...] -> [C, P, B/P, chunk, ...]; padding positions are computed and dropped.
        x = jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(parts, batch // parts, num_chunks, chunk_size, *x.shape[2:])
        x = jnp.moveaxis(x, 2, 0)
        return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    def gather(h: jax.Array) -> jax.Array:
        index = jnp.where(valid, pred_index, 0)[..., None]  # [B, S, 1]
        return to_chunks(jnp.take_along_axis(h, index, axis=1))  # [C, P, B/P, chunk, D]

    def per_shard(w: jax.Array) -> jax.Array:  # [V, D] -> [P, V, D]
        w = constrain(w, ("vocab", None))
        return constrain(jnp.broadcast_to(w[None], (parts, *w.shape)), ("batch", "vocab", None))

    xs = {"h": gather(hidden), "tokens": to_chunks(tokens)}
    unembedding = per_shard(unembedding)
    if with_ref:
        xs["ref_h"] = gather(ref_hidden)
        ref_unembedding = per_shard(ref_unembedding)
    body = functools.partial(
        _chunk_stats, with_entropy=with_entropy, with_sq=with_sq, with_ref=with_ref
    )
    body = jax.checkpoint(body)

    def step(carry, x):
        return carry, body(x, unembedding, ref_unembedding)

    _, out = jax.lax.scan(step, None, xs)  # each [C, P, B/P, chunk]
    result = {}
    for name, value in out.items():
        value = jnp.moveaxis(value, 0, 2).reshape(batch, padded)[:, :length]  # [B, S]
        result[name] = jnp.where(valid, value, 0.0)
    return result


def _chunk_stats(
    x: dict[str, jax.Array],
    unembedding: jax.Array,
    ref_unembedding: jax.Array | None,
    *,
    with_entropy: bool,
    with_sq: bool,
    with_ref: bool,
) -> dict[str, jax.Array]:
    """Statistics of one chunk: ``x["h"]`` ``[P, B/P, c, D]``, ``x["tokens"]`` ``[P, B/P, c]``
    and the per-shard unembeddings ``[P, V, D]``."""
    logits = _project(x["h"], unembedding)  # [P, B/P, c, V] fp32
    lse = jax.nn.logsumexp(logits, axis=-1)  # [P, B/P, c]
    picked = jnp.take_along_axis(logits, x["tokens"][..., None], axis=-1)[..., 0]
    out = {"logps": picked - lse}
    if with_entropy or with_ref:
        logp = logits - lse[..., None]  # [B, c, V]
    if with_entropy:
        out["entropy"] = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    if with_sq:
        # log Σ p² = logsumexp(2·logits) − 2·lse, without forming p.
        out["log_sq"] = jax.nn.logsumexp(2.0 * logits, axis=-1) - 2.0 * lse
    if with_ref:
        ref_logp = jax.nn.log_softmax(_project(x["ref_h"], ref_unembedding), axis=-1)
        out["ref_logps"] = jnp.take_along_axis(ref_logp, x["tokens"][..., None], axis=-1)[..., 0]
        out["kl"] = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
    return out


def _project(h: jax.Array, unembedding: jax.Array) -> jax.Array:
    """``h @ unembedding.T`` per batch shard, accumulated in fp32:
    ``[P, b, c, D] x [P, V, D] -> [P, b, c, V]``."""
    return jnp.einsum("pbcd,pvd->pbcv", h, unembedding, preferred_element_type=jnp.float32)


def _check_shapes(hidden, unembedding, tokens, pred_index, chunk_size, prefix="") -> None:
    if hidden.ndim != 3:
        raise ValueError(f"{prefix}hidden must be [B, S, D], got shape {hidden.shape}")
    if unembedding.ndim != 2 or unembedding.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"{prefix}unembedding must be [V, D] with D = {hidden.shape[2]}, "
            f"got shape {unembedding.shape}"
        )
    if tokens.shape != hidden.shape[:2] or pred_index.shape != hidden.shape[:2]:
        raise ValueError(
            f"tokens {tokens.shape} and pred_index {pred_index.shape} must match "
            f"{prefix}hidden's [B, S] = {hidden.shape[:2]}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def node_sums(
    values: ArrayLike, node_slot: ArrayLike, valid: ArrayLike, num_nodes: int
) -> jax.Array:
    """Sums per-token values into node slots; node ``(row, slot)`` has flat id ``row * N + slot``.

    Args:
        values: per-token values ``[R, S]`` (log-probs, KL, counts, ...).
        node_slot: ``[R, S]`` int node slot of each token, in ``[0, N)``.
        valid: ``[R, S]`` bool, tokens that count (e.g. ``pred_index >= 0``).
        num_nodes: ``N``, node slots per row.

    Returns:
        ``[R * N]`` float32 node sums.

    >>> node_sums(jnp.array([[1.0, 2.0, 4.0]]), jnp.array([[0, 1, 1]]),
    ...           jnp.array([[True, True, True]]), 3).tolist()
    [1.0, 6.0, 0.0]
    """
    values = jnp.where(valid, jnp.asarray(values, jnp.float32), 0.0)  # [R, S]
    node_slot = jnp.asarray(node_slot, jnp.int32)

    def row_sums(v: jax.Array, s: jax.Array) -> jax.Array:
        return jax.ops.segment_sum(v, s, num_segments=num_nodes)  # [N]

    return jax.vmap(row_sums)(values, node_slot).reshape(-1)  # [R * N]


def gather_steps(node_values: ArrayLike, response_nodes: ArrayLike) -> jax.Array:
    """Picks node values along each response path: ``[R * N]`` -> ``[NG, K, M]``, 0 for id < 0.

    >>> gather_steps(jnp.array([1.0, 2.0, 3.0]), jnp.array([[[2, 0], [1, -1]]])).tolist()
    [[[3.0, 1.0], [2.0, 0.0]]]
    """
    node_values = jnp.asarray(node_values)
    ids = jnp.asarray(response_nodes, jnp.int32)
    return jnp.where(ids >= 0, node_values[jnp.maximum(ids, 0)], 0.0)


class ResponseLogps(NamedTuple):
    """Per-token values summed over responses (fields are float32)."""

    logps: jax.Array  # [NG, K] sum over the response's scored tokens
    step_logps: jax.Array  # [NG, K, M] sum over each step (node) of the response path
    token_counts: jax.Array  # [NG, K] number of scored tokens in the response
    step_counts: jax.Array  # [NG, K, M] number of scored tokens in each step


def response_logps(
    token_values: ArrayLike,
    node_slot: ArrayLike,
    pred_index: ArrayLike,
    response_nodes: ArrayLike,
    num_nodes: int,
) -> ResponseLogps:
    """Sums per-token values (log-probs, or KL, entropy, ...) into steps and responses.

    Args:
        token_values: ``[R, S]``, e.g. from :func:`token_logps`.
        node_slot: ``[R, S]`` node slot of each token.
        pred_index: ``[R, S]``; tokens with ``pred_index >= 0`` are scored.
        response_nodes: ``[NG, K, M]`` flat node ids ``row * N + slot``, −1 padding.
        num_nodes: ``N``, node slots per row.

    Returns:
        :class:`ResponseLogps` with ``logps`` ``[NG, K]``, ``step_logps`` ``[NG, K, M]``,
        ``token_counts`` ``[NG, K]``, ``step_counts`` ``[NG, K, M]``.

    >>> r = response_logps(jnp.array([[0.0, -1.0, -2.0]]), jnp.array([[0, 1, 2]]),
    ...                    jnp.array([[-1, 0, 0]]), jnp.array([[[1], [2]]]), 3)
    >>> r.logps.tolist(), r.token_counts.tolist()
    ([[-1.0, -2.0]], [[1.0, 1.0]])
    """
    valid = jnp.asarray(pred_index) >= 0  # [R, S]
    node_values = node_sums(token_values, node_slot, valid, num_nodes)  # [R * N]
    node_counts = node_sums(jnp.ones(valid.shape), node_slot, valid, num_nodes)  # [R * N]
    step_logps = gather_steps(node_values, response_nodes)  # [NG, K, M]
    step_counts = gather_steps(node_counts, response_nodes)  # [NG, K, M]
    return ResponseLogps(
        logps=step_logps.sum(-1),
        step_logps=step_logps,
        token_counts=step_counts.sum(-1),
        step_counts=step_counts,
    )
