"""Memory-efficient tree attention: blockwise online softmax that never forms ``[S, S]``.

Axis layout: ``B`` batch rows, ``S`` positions (queries and keys of one packed row), ``H`` query
heads, ``K`` key/value heads (``H = K * G``), ``hd`` head width; blocked arrays lead with ``n``
blocks of ``t`` queries or ``s`` keys (``t = s = block``).

The row is cut into ``n = ceil(S / block)`` blocks. For query block ``i`` the forward pass walks
key blocks ``j = 0 .. i`` (keys after the query block are never visited), builds the
``[B, t, s]`` tree mask of the pair from ``segment``, ``node_pre``, ``node_last`` and the
positions, and runs the flash-attention update (running max ``m``, running sum,
accumulator) under ``lax.cond`` so a pair that is wholly masked for every row (another segment,
a sibling branch, padding) costs no matmul. Softmax statistics are fp32 whatever the compute
dtype. The backward pass is a ``custom_vjp`` (FlashAttention-2): it keeps the output and the
log-sum-exp ``[B, S, H]``, walks key blocks ``j`` and, inside, query blocks ``i >= j``,
recomputing each pair's probabilities. Peak memory is ``O(S * block)``, not ``O(S^2)``.

A query with no visible key (padding, segment 0) gets output 0 and zero gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax import lax

_NEG = -1e30  # "minus infinity" that stays finite: exp(_NEG - m) == 0, _NEG - _NEG == 0


def pair_mask(seg_q: jax.Array, pre_q: jax.Array, pos_q: jax.Array, seg_k: jax.Array,
              pre_k: jax.Array, last_k: jax.Array, pos_k: jax.Array) -> jax.Array:
    """The tree-attention rule: query-side ``[..., T, 1]`` broadcast against keys ``[..., 1, S]``.

    Key k is visible to query q iff ``segment[k] == segment[q] != 0``, ``k <= q`` and
    ``node_pre[k] <= node_pre[q] <= node_last[k]`` (k's node is an ancestor-or-self of q's).

    Returns:
      bool ``[..., T, S]``.
    """
    same = (seg_k == seg_q) & (seg_q != 0)
    return same & (pos_k <= pos_q) & (pre_k <= pre_q) & (pre_q <= last_k)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment: jax.Array,
                        node_pre: jax.Array, node_last: jax.Array, *,
                        block: int = 512) -> jax.Array:
    """Tree-masked softmax attention in blocks, without an ``[S, S]`` buffer.

    Args:
      q: queries ``[B, S, H, hd]``.
      k: keys ``[B, S, K, hd]``; ``H`` is a multiple of ``K``.
      v: values ``[B, S, K, hd]``.
      segment: int ``[B, S]``, group slot, 0 = padding.
      node_pre: int ``[B, S]``, preorder number of each token's node.
      node_last: int ``[B, S]``, largest preorder number in that node's subtree.
      block: query/key block length; clipped to ``S``, and ``S`` is padded up to a multiple.

    Returns:
      ``[B, S, H, hd]`` in ``q.dtype``; 0 for queries that see no key.

    >>> q = k = v = jnp.ones((1, 4, 2, 8))  # a row of 3 tokens and 1 padding token
    >>> segment, pre, last = jnp.array([[1, 1, 1, 0]]), jnp.zeros((1, 4)), jnp.zeros((1, 4))
    >>> blockwise_attention(q, k, v, segment, pre, last, block=2)[0, :, 0, 0].tolist()
    [1.0, 1.0, 1.0, 0.0]
    """
    length = q.shape[1]
    block = min(block, length)
    pad = -length % block
    if pad:  # padding tokens are segment 0: they see nothing and nothing sees them
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment, node_pre, node_last = (jnp.pad(x, ((0, 0), (0, pad)))
                                        for x in (segment, node_pre, node_last))
    ints = tuple(jnp.asarray(x, jnp.int32) for x in (segment, node_pre, node_last))
    return _attention(q, k, v, *ints, block)[:, :length]


def to_blocks(segment: jax.Array, node_pre: jax.Array, node_last: jax.Array,
              block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``[B, S]`` token arrays -> ``[n, B, block]`` each."""
    return tuple(rearrange(x, "b (n t) -> n b t", t=block)
                 for x in (segment, node_pre, node_last))


def _block_mask(tokens, i, j, block: int) -> jax.Array:
    """Mask ``[B, t, s]`` of query block ``i`` against key block ``j``."""
    seg, pre, last = tokens  # [n, B, t] each
    pos = jnp.arange(block)
    return pair_mask(seg[i][:, :, None], pre[i][:, :, None], (i * block + pos)[:, None],
                     seg[j][:, None, :], pre[j][:, None, :], last[j][:, None, :],
                     (j * block + pos)[None, :])


def _split(q, k, v, block):
    """Blocked, GQA-grouped views: q ``[n, B, K, G, t, hd]``, k and v ``[n, B, K, s, hd]``."""
    qb = rearrange(q, "b (n t) (k g) d -> n b k g t d", t=block, k=k.shape[2])
    kb, vb = (rearrange(x, "b (n s) k d -> n b k s d", s=block) for x in (k, v))
    return qb, kb, vb


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, segment, node_pre, node_last, block):
    return _forward(q, k, v, segment, node_pre, node_last, block)[0]


def _forward(q, k, v, segment, node_pre, node_last, block):
    """Output ``[B, S, H, hd]`` and log-sum-exp ``[n, B, K, G, t]`` (0 where nothing is seen)."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    qb, kb, vb = _split(q, k, v, block)
    tokens = to_blocks(segment, node_pre, node_last, block)
    n = qb.shape[0]

    def query_block(xs):
        i, qi = xs  # qi: [B, K, G, t, hd]

        def update(carry, mask, j):
            m, total, acc = carry  # [B, K, G, t], [B, K, G, t], [B, K, G, t, hd] fp32
            s = jnp.einsum("bkgtd,bksd->bkgts", qi, kb[j], preferred_element_type=jnp.float32)
            visible = mask[:, None, None]  # [B, 1, 1, t, s]
            s = jnp.where(visible, s * scale, _NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)  # [B, K, G, t, s]
            correction = jnp.exp(m - m_new)
            total = total * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(vb.dtype), vb[j],
                            preferred_element_type=jnp.float32)
            return m_new, total, acc * correction[..., None] + pv

        def body(j, carry):
            mask = _block_mask(tokens, i, j, block)  # [B, t, s]
            return lax.cond(jnp.any(mask), update, lambda c, *_: c, carry, mask, j)

        stats = jnp.full(qi.shape[:-1], _NEG, jnp.float32)
        init = (stats, jnp.zeros_like(stats), jnp.zeros(qi.shape, jnp.float32))
        m, total, acc = lax.fori_loop(0, i + 1, body, init)  # causal: key blocks 0 .. i
        seen = total > 0
        out = acc / jnp.where(seen, total, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), 0.0)
        return out.astype(q.dtype), lse

    out, lse = lax.map(query_block, (jnp.arange(n), qb))  # [n, B, K, G, t, hd], [n, B, K, G, t]
    return rearrange(out, "n b k g t d -> b (n t) (k g) d"), lse


def _attention_fwd(q, k, v, segment, node_pre, node_last, block):
    out, lse = _forward(q, k, v, segment, node_pre, node_last, block)
    return out, (q, k, v, segment, node_pre, node_last, out, lse)


def _attention_bwd(block, residuals, dout):
    q, k, v, segment, node_pre, node_last, out, lse = residuals
    scale = 1.0 / np.sqrt(q.shape[-1])
    qb, kb, vb = _split(q, k, v, block)
    dob, ob = _split(dout, k, v, block)[0], _split(out, k, v, block)[0]  # [n, B, K, G, t, hd]
    delta = jnp.sum(dob.astype(jnp.float32) * ob.astype(jnp.float32), axis=-1)  # [n, B, K, G, t]
    tokens = to_blocks(segment, node_pre, node_last, block)
    n = qb.shape[0]

    def key_block(dq, xs):
        j, kj, vj = xs  # [B, K, s, hd]

        def update(carry, mask, i):
            dq, dk, dv = carry
            qi, doi = qb[i], dob[i]  # [B, K, G, t, hd]
            s = jnp.einsum("bkgtd,bksd->bkgts", qi, kj, preferred_element_type=jnp.float32)
            visible = mask[:, None, None]  # [B, 1, 1, t, s]
            p = jnp.where(visible, jnp.exp(s * scale - lse[i][..., None]), 0.0)
            dv = dv + jnp.einsum("bkgts,bkgtd->bksd", p.astype(doi.dtype), doi,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgtd,bksd->bkgts", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[i][..., None]) * scale  # [B, K, G, t, s]
            dk = dk + jnp.einsum("bkgts,bkgtd->bksd", ds.astype(qi.dtype), qi,
                                 preferred_element_type=jnp.float32)
            dqi = jnp.einsum("bkgts,bksd->bkgtd", ds.astype(kj.dtype), kj,
                             preferred_element_type=jnp.float32)
            return dq.at[i].add(dqi), dk, dv

        def body(i, carry):
            mask = _block_mask(tokens, i, j, block)  # [B, t, s]
            return lax.cond(jnp.any(mask), update, lambda c, *_: c, carry, mask, i)

        zeros = jnp.zeros(kj.shape, jnp.float32)
        dq, dk, dv = lax.fori_loop(j, n, body, (dq, zeros, zeros))  # causal: query blocks >= j
        return dq, (dk, dv)

    dq0 = jnp.zeros(qb.shape, jnp.float32)
    dq, (dk, dv) = lax.scan(key_block, dq0, (jnp.arange(n), kb, vb))
    dq = rearrange(dq, "n b k g t d -> b (n t) (k g) d")
    dk, dv = (rearrange(x, "n b k s d -> b (n s) k d") for x in (dk, dv))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
