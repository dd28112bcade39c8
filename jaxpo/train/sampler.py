"""Sampling continuations of prompts with the policy, for on-policy rounds and evaluations.

    sampler = Sampler(run, prompts)              # tokenised once, one fixed [B, P] shape
    samples, tokens = sampler(params, [0, 3], key=key, temperature=1.0, top_p=1.0,
                              max_new_tokens=32, repeats=4)   # [(text, record text)] * 8

Generation is :func:`jaxpo.models.generate` (the jitted KV-cache generator) on the run's mesh
with the sharded training params: nothing gathers the weights on a host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxpo.config import Config
from jaxpo.data.tokenize import Tokenizer
from jaxpo.models.generate import generate
from jaxpo.train.setup import Run


class Sampler:
    """Samples continuations of prompts with the policy, in fixed shapes (one compilation).

    Prompts are tokenised as the GroupBuilder tokenises them (plain text with the tokenizer's
    special tokens, conversations through the chat template), cut to
    ``data.max_prompt_length`` and left-padded to the longest prompt of the pool.

    Args:
      run: the run (model graph, tokenizer, mesh, config).
      pool: the prompts that can be sampled.
    """

    def __init__(self, run: Run, pool: Sequence[Any]):
        self.run, self.pool = run, list(pool)
        self.ids = [prompt_ids(run.tokenizer, p, run.config) for p in self.pool]
        self.width = max(map(len, self.ids))

    def __call__(self, params: Any, indices: Sequence[int], *, key: jax.Array | None,
                 temperature: float, top_p: float, max_new_tokens: int, repeats: int = 1
                 ) -> tuple[list[tuple[str, str]], int]:
        """``(continuations, generated tokens)``: ``repeats`` continuations of each prompt,
        prompt-major (``[len(indices) * repeats]``), each as :func:`continuation` gives it."""
        tok = self.run.tokenizer
        rows = [self.ids[i] for i in indices for _ in range(repeats)]
        tokens = np.full((len(rows), self.width), tok.eos_id or 0, np.int32)
        mask = np.zeros(tokens.shape, bool)
        for i, row in enumerate(rows):
            tokens[i, self.width - len(row):] = row
            mask[i, self.width - len(row):] = True
        model = nnx.merge(self.run.graphdef, params)
        out = generate(model, self._place(tokens), self._place(mask),
                       max_new_tokens=max_new_tokens, key=key, temperature=temperature,
                       top_p=top_p, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id or 0)
        gen, gen_mask = host_value(out.tokens), host_value(out.mask)
        texts = [continuation(tok, row, g[m]) for row, g, m in zip(rows, gen, gen_mask)]
        return texts, int(gen_mask.sum())

    def _place(self, x: np.ndarray) -> jax.Array:
        """``x`` on the run's mesh, its rows split over the batch axes when they divide."""
        mesh = self.run.mesh
        batch = mesh.shape["data"] * mesh.shape["fsdp"]
        spec = PartitionSpec(("data", "fsdp")) if x.shape[0] % batch == 0 else PartitionSpec()
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])


def prompt_ids(tok: Tokenizer, prompt: Any, config: Config) -> list[int]:
    """A prompt's token ids as :class:`jaxpo.data.groups.GroupBuilder` makes them, cut to
    ``data.max_prompt_length`` (``data.truncation_mode``)."""
    if isinstance(prompt, list):  # a conversation
        ids = tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True),
                         add_special_tokens=False)
    else:
        ids = tok.encode(prompt)
    limit = config.data.max_prompt_length
    if limit and len(ids) > limit:
        ids = ids[-limit:] if config.data.truncation_mode == "keep_end" else ids[:limit]
    return ids


def continuation(tok: Tokenizer, prompt: Sequence[int], generated: Sequence[int]
                 ) -> tuple[str, str]:
    """``(text, record text)`` that ``generated`` adds after ``prompt``: the text up to the
    first end-of-sequence token (what a reward reads), and the same with that token's text
    (what a record holds: its tokens come back as sampled, an empty answer included). Decoded
    with the prompt so that word boundaries come out as the tokenizer writes them."""
    generated = list(generated)
    ended = tok.eos_id is not None and tok.eos_id in generated
    if ended:
        generated = generated[:generated.index(tok.eos_id) + 1]
    prompt = list(prompt)
    head = len(tok.decode(prompt, skip_special_tokens=True))
    text = tok.decode(prompt + generated, skip_special_tokens=True)[head:]
    if not ended:
        return text, text
    head = len(tok.decode(prompt))
    return text, tok.decode(prompt + generated)[head:]


def host_value(x: jax.Array) -> np.ndarray:
    """A global array's value on every process."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def greedy_rewards(run: Run, params: Any, prompts: Sequence[Any],
                   reward_fn: Callable[[Sequence[Any], Sequence[str]], np.ndarray], *,
                   max_new_tokens: int) -> np.ndarray:
    """Rewards ``[n]`` of the policy's greedy answers to ``prompts`` (for evaluations)."""
    sampler = Sampler(run, prompts)
    samples, _ = sampler(params, range(len(prompts)), key=None, temperature=0.0, top_p=1.0,
                         max_new_tokens=max_new_tokens)
    return reward_fn(list(prompts), [text for text, _ in samples])
