"""Batched greedy and nucleus-sampled decoding with a KV cache, compiled once per shape.

Prompts are ``[B, P]`` with a bool ``prompt_mask`` (left-padded, right-padded or ragged: any
pattern). Their tokens take cache slots ``0..P-1`` (padding slots are never attended to) and
positions ``0..len-1``; generated token ``t`` takes slot ``P + t`` and position ``len + t``.
A prefill pass fills the cache, then a ``lax.while_loop`` decodes one token per step until
``max_new_tokens`` or every row has produced an end-of-sequence token.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpo.models.transformer import Transformer


class GenerateOutput(NamedTuple):
    """Generated continuations.

    Attributes:
      tokens: int32 ``[B, N]``; ``pad_token_id`` after a row stopped.
      mask: bool ``[B, N]``, True for generated tokens (the end-of-sequence token included).
      lengths: int32 ``[B]``, the number of generated tokens per row.
    """

    tokens: jax.Array
    mask: jax.Array
    lengths: jax.Array


def generate(model: Transformer, prompts: jax.typing.ArrayLike,
             prompt_mask: jax.typing.ArrayLike | None = None, *, max_new_tokens: int,
             key: jax.Array | None = None, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: int | tuple[int, ...] | None = None,
             pad_token_id: int = 0) -> GenerateOutput:
    """Continues ``prompts`` with the model.

    Args:
      model: the decoder.
      prompts: int32 ``[B, P]``.
      prompt_mask: bool ``[B, P]``, True on real prompt tokens (default: all True).
      max_new_tokens: ``N``, the most tokens generated per row.
      key: PRNG key for sampling (required when ``temperature > 0``).
      temperature: 0 for greedy decoding; otherwise logits are divided by it and sampled.
      top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches
        ``top_p`` (the most likely token is always kept).
      eos_token_id: id(s) that end a row (default: the config's ``eos_token_id``).
      pad_token_id: written after a row has ended.

    Returns:
      A :class:`GenerateOutput`.
    """
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [B, P], got shape {prompts.shape}")
    if prompt_mask is None:
        prompt_mask = jnp.ones(prompts.shape, bool)
    prompt_mask = jnp.asarray(prompt_mask, bool)
    if prompt_mask.shape != prompts.shape:
        raise ValueError(f"prompt_mask shape {prompt_mask.shape} != prompts {prompts.shape}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    if eos_token_id is None:
        eos = model.config.eos_ids
    else:
        eos = tuple(eos_token_id) if isinstance(eos_token_id, (tuple, list)) else (eos_token_id,)
    key = jax.random.key(0) if key is None else key
    graphdef, state = nnx.split(model)
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)  # -1 never matches a token
    return _generate(graphdef, state, prompts, prompt_mask, key, jnp.float32(temperature),
                     jnp.float32(top_p), eos_ids, jnp.int32(pad_token_id),
                     max_new_tokens=max_new_tokens, greedy=temperature == 0)


def sample_token(logits: jax.Array, key: jax.Array, temperature: jax.typing.ArrayLike,
                 top_p: jax.typing.ArrayLike, *, greedy: bool = False) -> jax.Array:
    """Picks one token per row from fp32 ``logits`` ``[B, V]`` -> int32 ``[B]``.

    >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    >>> sample_token(logits, jax.random.key(0), 1.0, 0.5).tolist()  # nucleus = {token 0}
    [0]
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V], descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    kept = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1
    cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)  # [B, 1]
    nucleus = jnp.where(logits < cutoff, -jnp.inf, logits)
    logits = jnp.where(top_p < 1, nucleus, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy"))
def _generate(graphdef, state, prompts, prompt_mask, key, temperature, top_p, eos_ids, pad, *,
              max_new_tokens, greedy):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompts.shape
    total = prompt_len + max_new_tokens
    lengths = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)  # [B]
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)  # [B, P]
    valid = jnp.concatenate([prompt_mask, jnp.ones((batch, max_new_tokens), bool)], 1)  # [B, L]
    slots = jnp.arange(total)

    # Prefill: prompt slot i sees valid slots <= i (and itself, so padding stays finite).
    query = jnp.arange(prompt_len)[:, None]
    prefill_mask = (valid[:, None, :] & (slots <= query)) | (slots == query)  # [B, P, L]
    cache = model.init_cache(batch, total)
    logits, cache = model.decode(prompts, positions, prefill_mask, cache, 0)
    last = prompt_len - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=-1)  # last real prompt token
    key, sub = jax.random.split(key)
    token = sample_token(logits[jnp.arange(batch), last], sub, temperature, top_p,
                         greedy=greedy)

    def cond(carry):
        step, _, done, *_ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token, done, out, out_mask, cache, key = carry
        out = out.at[:, step].set(jnp.where(done, pad, token))
        out_mask = out_mask.at[:, step].set(~done)
        done = done | jnp.isin(token, eos_ids)
        slot = prompt_len + step
        step_mask = (valid & (slots <= slot))[:, None, :]  # [B, 1, L]
        logits, cache = model.decode(token[:, None], (lengths + step)[:, None], step_mask,
                                     cache, slot)
        key, sub = jax.random.split(key)
        token = sample_token(logits[:, 0], sub, temperature, top_p, greedy=greedy)
        return step + 1, token, done, out, out_mask, cache, key

    out = jnp.full((batch, max_new_tokens), pad, jnp.int32)
    out_mask = jnp.zeros((batch, max_new_tokens), bool)
    carry = (jnp.int32(0), token, jnp.zeros(batch, bool), out, out_mask, cache, key)
    _, _, _, out, out_mask, _, _ = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(out, out_mask, jnp.sum(out_mask, axis=-1).astype(jnp.int32))
