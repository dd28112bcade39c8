"""Rotary position embeddings (the half-split convention of Llama checkpoints).

A head vector ``x = [x1, x2]`` (two halves of ``head_dim / 2``) at position ``p`` becomes
``x * cos(p w) + [-x2, x1] * sin(p w)`` with frequencies ``w`` repeated over both halves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxpo.models.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies ``[head_dim / 2]`` (float32), with llama3 scaling if set.

    >>> from jaxpo.models.config import get_preset
    >>> inv_frequencies(get_preset("tiny")).shape
    (8,)
    """
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
    inv = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv
    # Llama 3: long wavelengths are divided by `factor`, short ones kept, the band between
    # interpolated smoothly.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates ``x`` ``[B, T, N, head_dim]`` by ``positions`` ``[B, T]`` (computed in fp32)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, hd]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
