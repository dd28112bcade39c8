"""Grouped-query attention with the tree-packed mask and an optional KV cache.

Axis layout: ``B`` batch rows, ``T`` query positions, ``S`` key positions, ``H`` query heads,
``K`` key/value heads (``H = K * G``), ``hd`` head width, ``D`` model width.

A packed batch reaches attention as a :class:`TreeLayout` and is attended as
``ModelConfig.attention`` says: ``blockwise`` (default; :mod:`jaxpo.models.blockwise_attention`,
never forms ``[S, S]``), ``pallas`` (:mod:`jaxpo.models.pallas_attention`), or ``dense`` /
``dot_product`` (the reference: the ``[B, S, S]`` :func:`tree_mask` and fp32 ``[B, H, S, S]``
scores). Decoding with a KV cache always takes an explicit mask and the dense path.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from jaxpo.models.blockwise_attention import blockwise_attention, pair_mask
from jaxpo.models.config import ModelConfig
from jaxpo.models.lora import Adapter
from jaxpo.models.pallas_attention import pallas_attention
from jaxpo.models.rope import apply_rope, inv_frequencies

Cache = tuple[jax.Array, jax.Array]  # keys, values: [B, L, K, hd] each


class TreeLayout(NamedTuple):
    """The packed-batch arrays that define the tree mask, int ``[B, S]`` each."""

    segment: jax.Array  # group slot, 1-based, 0 = padding
    node_pre: jax.Array  # preorder number of the token's node
    node_last: jax.Array  # largest preorder number in that node's subtree


def tree_mask(segment: jax.Array, node_pre: jax.Array, node_last: jax.Array) -> jax.Array:
    """The packed-batch attention mask ``[B, S, S]`` (query, key).

    Key k is visible to query q iff ``segment[k] == segment[q] != 0``, ``k <= q`` and
    ``node_pre[k] <= node_pre[q] <= node_last[k]``; a padding query sees itself only, so its
    softmax is finite.

    >>> seg = jnp.array([[1, 1, 1, 1]]); pre = jnp.array([[0, 0, 1, 2]])
    >>> last = jnp.array([[2, 2, 1, 2]])
    >>> tree_mask(seg, pre, last)[0].astype(int).tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]
    """
    q = (slice(None), slice(None), None)  # query axis
    k = (slice(None), None, slice(None))  # key axis
    pos = jnp.arange(segment.shape[-1])
    mask = pair_mask(segment[q], node_pre[q], pos[:, None], segment[k], node_pre[k],
                     node_last[k], pos[None, :])
    return mask | jnp.eye(pos.size, dtype=bool)[None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
           impl: str = "dense") -> jax.Array:
    """Masked softmax attention, fp32 scores and softmax.

    Args:
      q: queries ``[B, T, H, hd]``.
      k: keys ``[B, S, K, hd]``; ``H`` is a multiple of ``K``.
      v: values ``[B, S, K, hd]``.
      mask: bool ``[B, T, S]``, True where the key is visible; every query sees some key.
      impl: ``dense`` (reference einsum path) or ``dot_product`` (``jax.nn``).

    Returns:
      ``[B, T, H, hd]`` in ``q.dtype``.
    """
    scale = 1.0 / np.sqrt(q.shape[-1])
    if impl == "dot_product":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)
    qg = rearrange(q, "b t (k g) d -> b t k g d", k=k.shape[2])  # [B, T, K, G, hd]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return rearrange(out, "b t k g d -> b t (k g) d")


def tree_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: TreeLayout,
                   cfg: ModelConfig) -> jax.Array:
    """Self-attention of a packed batch under its tree mask, by ``cfg.attention``.

    Args:
      q: queries ``[B, S, H, hd]``.
      k: keys ``[B, S, K, hd]``.
      v: values ``[B, S, K, hd]``.
      layout: the row's :class:`TreeLayout`.
      cfg: ``attention`` picks the path; ``attention_block`` / ``pallas_block`` size the blocks.

    Returns:
      ``[B, S, H, hd]``. The paths agree on every real token; a padding query (segment 0) gets
      0 from ``blockwise``/``pallas`` and its own value from ``dense`` (it sees itself there).
    """
    if cfg.attention == "blockwise":
        return blockwise_attention(q, k, v, *layout, block=cfg.attention_block)
    if cfg.attention == "pallas":
        return pallas_attention(q, k, v, *layout, block=cfg.pallas_block)
    return attend(q, k, v, tree_mask(*layout), impl=cfg.attention)


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], names: tuple[str, ...],
          cfg: ModelConfig, init: str = "normal") -> nnx.Param:
    """A parameter in ``cfg.param_dtype`` tagged with logical axis ``names``."""
    dtype = jnp.dtype(cfg.param_dtype)
    if init == "normal":
        value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)
        value = value.astype(dtype)
    else:
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
    # Sharding is applied by jaxpo.sharding from the names, not eagerly at creation.
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis, normalised in fp32."""

    def __init__(self, size: int, cfg: ModelConfig, axis_name: str = "embed"):
        self.eps = cfg.rms_norm_eps
        self.scale = param(None, (size,), (axis_name,), cfg, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return xf.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v bias and per-head q/k norm."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg)
        self.k = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg)
        self.v = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg)
        self.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), cfg)
        if cfg.qkv_bias:
            self.q_bias = param(None, (h, hd), ("heads", "head_dim"), cfg, init="zeros")
            self.k_bias = param(None, (kv, hd), ("kv_heads", "head_dim"), cfg, init="zeros")
            self.v_bias = param(None, (kv, hd), ("kv_heads", "head_dim"), cfg, init="zeros")
        if cfg.o_bias:
            self.o_bias = param(None, (d,), ("embed",), cfg, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg, axis_name="head_dim")
            self.k_norm = RMSNorm(hd, cfg, axis_name="head_dim")
        if cfg.lora is not None:  # low-rank updates of the targeted projections
            shapes = {"q": ((d,), ("embed",), (h, hd), ("heads", "head_dim")),
                      "k": ((d,), ("embed",), (kv, hd), ("kv_heads", "head_dim")),
                      "v": ((d,), ("embed",), (kv, hd), ("kv_heads", "head_dim")),
                      "o": ((h, hd), ("heads", "head_dim"), (d,), ("embed",))}
            for name, shape in shapes.items():
                if name in cfg.lora.targets:
                    setattr(self, f"{name}_lora",
                            Adapter(*shape, cfg.lora, cfg.param_dtype, rngs=rngs))

    def _adapted(self, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
        """``y = x·W_name`` plus the LoRA update of ``x`` when ``name`` is adapted."""
        adapter = getattr(self, f"{name}_lora", None)
        return y if adapter is None else y + adapter(x)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | TreeLayout,
                 cache: Cache | None = None, cache_index: jax.Array | None = None,
                 ) -> tuple[jax.Array, Cache | None]:
        """Attends ``x`` ``[B, T, D]``; with a cache, writes keys at ``cache_index`` first.

        Args:
          x: inputs ``[B, T, D]`` in the compute dtype.
          positions: RoPE positions ``[B, T]``.
          mask: a packed batch's :class:`TreeLayout` (attended by ``cfg.attention``, no cache),
            or bool ``[B, T, S]`` (dense path); ``S = T`` without a cache, the cache length
            with one.
          cache: optional ``(keys, values)`` ``[B, L, K, hd]``.
          cache_index: scalar slot where this call's ``T`` keys are written.

        Returns:
          ``([B, T, D], updated cache or None)``.
        """
        cfg, dtype = self.cfg, x.dtype
        q = jnp.einsum("btd,dhe->bthe", x, self.q[...].astype(dtype))  # [B, T, H, hd]
        k = jnp.einsum("btd,dke->btke", x, self.k[...].astype(dtype))  # [B, T, K, hd]
        v = jnp.einsum("btd,dke->btke", x, self.v[...].astype(dtype))
        q, k, v = self._adapted("q", x, q), self._adapted("k", x, k), self._adapted("v", x, v)
        if cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dtype)
            k = k + self.k_bias[...].astype(dtype)
            v = v + self.v_bias[...].astype(dtype)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = inv_frequencies(cfg)  # numpy constant, computed at trace time
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if cache is not None:
            start = (0, cache_index, 0, 0)
            cache = (jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start),
                     jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start))
            k, v = cache
        if isinstance(mask, TreeLayout):
            if cache is not None:
                raise ValueError("a KV cache needs an explicit [B, T, L] mask, not a TreeLayout")
            out = tree_attention(q, k, v, mask, cfg)  # [B, T, H, hd]
        else:
            out = attend(q, k, v, mask, impl="dot_product" if cfg.attention == "dot_product"
                         else "dense")
        y = jnp.einsum("bthe,hed->btd", out, self.o[...].astype(dtype))
        y = self._adapted("o", out, y)
        if cfg.o_bias:
            y = y + self.o_bias[...].astype(dtype)
        return y, cache
