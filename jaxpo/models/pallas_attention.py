"""Fused tree attention as Pallas kernels (forward and backward), GPU/TPU, CPU interpret mode.

Axis layout: ``B`` batch rows, ``S`` positions, ``H`` query heads, ``K`` key/value heads
(``H = K * G``), ``hd`` head width, ``t``/``s`` query/key block length (``t = s = block``).

The same algorithm as :mod:`jaxpo.models.blockwise_attention`, one program per (row, query head,
block): the forward kernel holds a ``[t, hd]`` query block and walks key blocks ``0 .. i``; the
tree mask of each pair is computed in the kernel from the token arrays (query side as columns
``[t, 1]``, key side as rows ``[1, s]``, so every value is 2-D), and a pair with no visible key
is skipped by ``lax.cond`` before any matmul. The backward pass is two kernels in the
FlashAttention-2 style: dK/dV per key block (walking query blocks ``>= j``) and dQ per query
block (walking key blocks ``<= i``); dK/dV are computed per query head and summed over the GQA
group outside. On CPU the kernels run in Pallas interpret mode, where the tests check them
against the dense path; the tests also lower them for Triton (GPU) and Mosaic (TPU), but they
have not yet been compiled or timed on either device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange, reduce
from jax import lax
from jax.experimental import pallas as pl

from jaxpo.models.blockwise_attention import pair_mask

_NEG = -1e30  # finite "minus infinity", as in blockwise_attention
_ALTERNATIVE = "use --config.model.attention=blockwise (same numbers, pure JAX)"


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment: jax.Array,
                     node_pre: jax.Array, node_last: jax.Array, *, block: int = 128,
                     interpret: bool | None = None) -> jax.Array:
    """Tree-masked softmax attention as fused Pallas kernels.

    Args:
      q: queries ``[B, S, H, hd]``.
      k: keys ``[B, S, K, hd]``; ``H`` is a multiple of ``K``.
      v: values ``[B, S, K, hd]``.
      segment: int ``[B, S]``, group slot, 0 = padding.
      node_pre: int ``[B, S]``, preorder number of each token's node.
      node_last: int ``[B, S]``, largest preorder number in that node's subtree.
      block: query/key block length; clipped to the next power of two >= ``S``, and ``S`` is
        padded up to a multiple of it.
      interpret: run the kernels in Pallas interpret mode; default: on the CPU backend only.

    Returns:
      ``[B, S, H, hd]`` in ``q.dtype``; 0 for queries that see no key.

    Raises:
      ValueError: the backend or the shapes are not supported by the kernel (the message names
        ``--config.model.attention=blockwise``).
    """
    length, head_dim = q.shape[1], q.shape[3]
    block = min(block, int(pl.next_power_of_2(length)))
    interpret = check_supported(block, head_dim, interpret)
    pad = -length % block
    if pad:  # padding tokens are segment 0: they see nothing and nothing sees them
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment, node_pre, node_last = (jnp.pad(x, ((0, 0), (0, pad)))
                                        for x in (segment, node_pre, node_last))
    qt, kt, vt = (rearrange(x, "b s h d -> b h s d") for x in (q, k, v))
    seg, pre, last = (jnp.asarray(x, jnp.int32) for x in (segment, node_pre, node_last))
    tokens = (seg[..., None], pre[..., None], seg[:, None], pre[:, None], last[:, None])
    out = _attention(qt, kt, vt, tokens, block, interpret)  # [B, H, S, hd]
    return rearrange(out, "b h s d -> b s h d")[:, :length]


def check_supported(block: int, head_dim: int, interpret: bool | None) -> bool:
    """Whether to interpret; a ``ValueError`` naming the alternative where the kernel can't run."""
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend == "cpu"
    if interpret:
        return True
    if backend == "gpu":  # Triton: power-of-two tiles of at least 16 for tl.dot
        for name, size in (("pallas_block", block), ("head_dim", head_dim)):
            if size < 16 or size & (size - 1):
                raise ValueError(f"attention=pallas on GPU needs {name} a power of two >= 16, "
                                 f"got {size}; {_ALTERNATIVE}")
        return False
    if backend == "tpu":  # Mosaic: sublane-aligned query/key blocks
        if block % 8:
            raise ValueError(f"attention=pallas on TPU needs pallas_block a multiple of 8, got "
                             f"{block}; {_ALTERNATIVE}")
        return False
    raise ValueError(f"attention=pallas has no kernel for the {backend!r} backend; "
                     f"{_ALTERNATIVE}")


def _call_options(interpret: bool, head_dim: int) -> dict:
    """``pallas_call`` keywords: interpret mode, or the backend's compiler (Triton on GPU)."""
    if interpret:
        return {"interpret": True}
    if jax.default_backend() == "gpu":
        from jax.experimental.pallas import triton as pltriton

        warps = 4 if head_dim <= 64 else 8
        return {"compiler_params": pltriton.CompilerParams(num_warps=warps, num_stages=2)}
    from jax.experimental.pallas import tpu as pltpu

    # Every program writes its own output block: all three grid axes are independent.
    return {"compiler_params": pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)}


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """fp32 2-D matmul contracting ``a``'s axis ``contract[0]`` with ``b``'s ``contract[1]``."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _positions(start, size: int, axis: int) -> jax.Array:
    shape = (size, 1) if axis == 0 else (1, size)
    return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def _any(mask: jax.Array) -> jax.Array:
    return jnp.max(mask.astype(jnp.int32)) > 0  # a plain max reduction lowers everywhere


def _forward_kernel(seg_q_ref, pre_q_ref, seg_k_ref, pre_k_ref, last_k_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, *, block: int, scale: float):
    i = pl.program_id(2)
    q = q_ref[...]  # [t, hd]
    seg_q, pre_q = seg_q_ref[...], pre_q_ref[...]  # [t, 1]
    pos_q = _positions(i * block, block, 0)

    def body(j, carry):
        keys = pl.ds(j * block, block)
        mask = pair_mask(seg_q, pre_q, pos_q, seg_k_ref[:, keys], pre_k_ref[:, keys],
                         last_k_ref[:, keys], _positions(j * block, block, 1))  # [t, s]

        def update(carry):
            m, total, acc = carry  # [t, 1], [t, 1], [t, hd] fp32
            s = jnp.where(mask, _dot(q, k_ref[keys, :], (1, 1)) * scale, _NEG)  # [t, s]
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            correction = jnp.exp(m - m_new)
            total = total * correction + jnp.sum(p, axis=1, keepdims=True)
            v = v_ref[keys, :]
            return m_new, total, acc * correction + _dot(p.astype(v.dtype), v, (1, 0))

        return lax.cond(_any(mask), update, lambda c: c, carry)

    stat = jnp.full((block, 1), _NEG, jnp.float32)
    init = (stat, jnp.zeros_like(stat), jnp.zeros(q.shape, jnp.float32))
    m, total, acc = lax.fori_loop(0, i + 1, body, init)
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    o_ref[...] = (acc / safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe), 0.0)


def _dq_kernel(seg_q_ref, pre_q_ref, seg_k_ref, pre_k_ref, last_k_ref, q_ref, k_ref, v_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, block: int, scale: float):
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]  # [t, hd]
    lse, delta = lse_ref[...], delta_ref[...]  # [t, 1]
    seg_q, pre_q = seg_q_ref[...], pre_q_ref[...]
    pos_q = _positions(i * block, block, 0)

    def body(j, dq):
        keys = pl.ds(j * block, block)
        mask = pair_mask(seg_q, pre_q, pos_q, seg_k_ref[:, keys], pre_k_ref[:, keys],
                         last_k_ref[:, keys], _positions(j * block, block, 1))  # [t, s]

        def update(dq):
            k, v = k_ref[keys, :], v_ref[keys, :]  # [s, hd]
            p = jnp.where(mask, jnp.exp(_dot(q, k, (1, 1)) * scale - lse), 0.0)  # [t, s]
            ds = p * (_dot(do, v, (1, 1)) - delta) * scale
            return dq + _dot(ds.astype(k.dtype), k, (1, 0))

        return lax.cond(_any(mask), update, lambda c: c, dq)

    dq_ref[...] = lax.fori_loop(0, i + 1, body, jnp.zeros(q.shape, jnp.float32))


def _dkv_kernel(seg_q_ref, pre_q_ref, seg_k_ref, pre_k_ref, last_k_ref, q_ref, k_ref, v_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, block: int, scale: float):
    j, num_blocks = pl.program_id(2), pl.num_programs(2)
    k, v = k_ref[...], v_ref[...]  # [s, hd]
    seg_k, pre_k, last_k = seg_k_ref[...], pre_k_ref[...], last_k_ref[...]  # [1, s]
    pos_k = _positions(j * block, block, 1)

    def body(i, carry):
        queries = pl.ds(i * block, block)
        mask = pair_mask(seg_q_ref[queries, :], pre_q_ref[queries, :],
                         _positions(i * block, block, 0), seg_k, pre_k, last_k, pos_k)  # [t, s]

        def update(carry):
            dk, dv = carry  # [s, hd] fp32
            q, do = q_ref[queries, :], do_ref[queries, :]  # [t, hd]
            p = jnp.where(mask, jnp.exp(_dot(q, k, (1, 1)) * scale - lse_ref[queries, :]), 0.0)
            dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
            ds = p * (_dot(do, v, (1, 1)) - delta_ref[queries, :]) * scale  # [t, s]
            return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

        return lax.cond(_any(mask), update, lambda c: c, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(j, num_blocks, body, (zeros, zeros))
    dk_ref[...], dv_ref[...] = dk, dv


def _query_major_specs(heads: int, kv_heads: int, length: int, head_dim: int, block: int):
    """BlockSpecs for grid ``(B, H, n)`` where program ``(b, h, i)`` owns query block ``i``.

    Inputs in kernel order: query columns ``[t, 1]`` (segment, node_pre), key rows ``[1, S]``
    (segment, node_pre, node_last), q ``[t, hd]``, k and v ``[S, hd]`` of head h's KV head.
    Returns ``(token and q/k/v specs, q-block spec, per-query statistic spec [t, 1])``.
    """
    groups = heads // kv_heads
    column = pl.BlockSpec((None, block, 1), lambda b, h, i: (b, i, 0))
    row = pl.BlockSpec((None, 1, length), lambda b, h, i: (b, 0, 0))
    q = pl.BlockSpec((None, None, block, head_dim), lambda b, h, i: (b, h, i, 0))
    kv = pl.BlockSpec((None, None, length, head_dim), lambda b, h, i: (b, h // groups, 0, 0))
    stat = pl.BlockSpec((None, None, block, 1), lambda b, h, i: (b, h, i, 0))
    return [column, column, row, row, row, q, kv, kv], q, stat


def _key_major_specs(heads: int, kv_heads: int, length: int, head_dim: int, block: int):
    """As :func:`_query_major_specs`, but program ``(b, h, j)`` owns key block ``j``.

    Query columns are ``[S, 1]``, key rows ``[1, s]``, q ``[S, hd]``, k and v ``[s, hd]``,
    statistics ``[S, 1]``.
    """
    groups = heads // kv_heads
    column = pl.BlockSpec((None, length, 1), lambda b, h, j: (b, 0, 0))
    row = pl.BlockSpec((None, 1, block), lambda b, h, j: (b, 0, j))
    q = pl.BlockSpec((None, None, length, head_dim), lambda b, h, j: (b, h, 0, 0))
    kv = pl.BlockSpec((None, None, block, head_dim), lambda b, h, j: (b, h // groups, j, 0))
    stat = pl.BlockSpec((None, None, length, 1), lambda b, h, j: (b, h, 0, 0))
    return [column, column, row, row, row, q, kv, kv], q, stat


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, tokens, block, interpret):
    return _forward(q, k, v, tokens, block, interpret)[0]


def _forward(q, k, v, tokens, block, interpret):
    """q ``[B, H, S, hd]``, k and v ``[B, K, S, hd]`` -> out like q, lse ``[B, H, S, 1]``."""
    batch, heads, length, head_dim = q.shape
    inputs, q_spec, stat = _query_major_specs(heads, k.shape[1], length, head_dim, block)
    kernel = functools.partial(_forward_kernel, block=block, scale=1.0 / np.sqrt(head_dim))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, length // block),
        in_specs=inputs,
        out_specs=[q_spec, stat],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, length, 1), jnp.float32)],
        name="tree_attention_forward",
        **_call_options(interpret, head_dim),
    )(*tokens, q, k, v)


def _attention_fwd(q, k, v, tokens, block, interpret):
    out, lse = _forward(q, k, v, tokens, block, interpret)
    return out, (q, k, v, tokens, out, lse)


def _attention_bwd(block, interpret, residuals, dout):
    q, k, v, tokens, out, lse = residuals
    batch, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    args = (*tokens, q, k, v, dout, lse, delta)
    params = {"block": block, "scale": 1.0 / np.sqrt(head_dim)}
    grid = (batch, heads, length // block)

    inputs, q_spec, stat = _query_major_specs(heads, kv_heads, length, head_dim, block)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **params), grid=grid,
        in_specs=[*inputs, q_spec, stat, stat], out_specs=q_spec,  # + dout, lse, delta
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        name="tree_attention_dq", **_call_options(interpret, head_dim),
    )(*args)

    inputs, q_spec, stat = _key_major_specs(heads, kv_heads, length, head_dim, block)
    per_head = pl.BlockSpec((None, None, block, head_dim), lambda b, h, j: (b, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **params), grid=grid,
        in_specs=[*inputs, q_spec, stat, stat],
        out_specs=[per_head, per_head],
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 2,
        name="tree_attention_dkv", **_call_options(interpret, head_dim),
    )(*args)
    # dK/dV were computed per query head: sum each GQA group into its key/value head.
    dk, dv = (reduce(x, "b (k g) s d -> b k s d", "sum", k=kv_heads) for x in (dk, dv))
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), tokens)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zeros


_attention.defvjp(_attention_fwd, _attention_bwd)
