"""How good a policy is on a task with a programmatic true reward, measured on held-out data.

    m = Measure(run, config, synthetic.true_reward)   # held-out prompts and pairs of config
    m(params, ref_params)  # {"true_reward", "exact", "accuracy"}
    m.kl(params, ref_params, key)

- *true reward*: mean over held-out prompts of the true reward of the greedy answer (up to
  ``max_new_tokens`` tokens); *exact*: the share of greedy answers with reward 1;
- *preference accuracy*: the share of held-out pairs whose chosen response gets the higher
  implicit reward ``β·(log π − log π_ref)`` (β > 0 does not change the order; ties count one
  half, so a policy equal to its reference scores 0.5);
- *KL to the reference*: the Monte-Carlo estimate ``E_{y~π}[log π(y|x) − log π_ref(y|x)]`` over
  held-out prompts x and responses y sampled from π at temperature 1 (the end-of-sequence token
  included; a response cut at ``max_new_tokens`` counts as it stands).

The embedded demo (:mod:`jaxpo.demo`) and ``jaxpo bench quality`` (:mod:`jaxpo.bench.quality`)
both measure with it. Every function here is compiled once per model and shape: one
:class:`Measure` serves every policy of a model.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpo import config as config_lib
from jaxpo.models import generate
from jaxpo.train import inputs
from jaxpo.train.loss_inputs import BATCH_KEYS, sequence_logps
from jaxpo.train.setup import Run


class Measure:
    """``measure(params, ref_params) -> {"true_reward", "exact", "accuracy"}`` on held-out data.

    Args:
      run: any run of the model (the graph and tokenizer are shared).
      config: a pair run's config: its ``data.eval_files`` (pairs) hold the held-out prompts
        (the first ``num_prompts``) and pairs, batched as that config says.
      reward: the task's true reward ``(prompt, response text) -> [0, 1]``.
      num_prompts: held-out prompts for the generation reward and the KL.
      max_new_tokens: the longest generated answer.
    """

    def __init__(self, run: Run, config: config_lib.Config, reward: Callable[[str, str], float],
                 *, num_prompts: int = 128, max_new_tokens: int = 8):
        self.run, self.config, self.reward = run, config, reward
        self.max_new_tokens = max_new_tokens
        self.prompts = []
        for path in config.data.eval_files:
            with open(path, encoding="utf-8") as f:
                self.prompts += [json.loads(line)["prompt"] for line in f if line.strip()]
        self.prompts = self.prompts[:num_prompts]
        tok = run.tokenizer
        ids = [tok.encode(p) for p in self.prompts]
        width = max(map(len, ids))
        self.tokens = np.full((len(ids), width), tok.eos_id or 0, np.int32)  # left-padded
        self.mask = np.zeros((len(ids), width), bool)
        for i, row in enumerate(ids):
            self.tokens[i, width - len(row):] = row
            self.mask[i, width - len(row):] = True
        self.logps = jax.jit(lambda p, b: sequence_logps(
            run.graphdef, p, b, num_nodes=inputs.node_slots(config),
            chunk_size=config.model.logprob_chunk_size).logps)  # [NG, K]

    def __call__(self, params: Any, ref_params: Any) -> dict[str, float]:
        rewards = self.generation_rewards(params)
        return {"true_reward": float(np.mean(rewards)), "exact": float(np.mean(rewards == 1.0)),
                "accuracy": self.accuracy(params, ref_params)}

    def generation_rewards(self, params: Any) -> np.ndarray:
        """The true reward of the greedy answer to each held-out prompt ``[num_prompts]``."""
        tok = self.run.tokenizer
        model = nnx.merge(self.run.graphdef, params)
        out = generate(model, self.tokens, self.mask, max_new_tokens=self.max_new_tokens,
                       eos_token_id=tok.eos_id)
        tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
        texts = [tok.decode(row[m]) for row, m in zip(tokens, mask)]
        return np.array([self.reward(p, t) for p, t in zip(self.prompts, texts)])

    def accuracy(self, params: Any, ref_params: Any) -> float:
        """Held-out preference accuracy of ``β·(log π − log π_ref)`` (ties count 1/2)."""
        config = self.config
        builder = inputs.group_builder(config, self.run.tokenizer, "minmax")
        wins, total = 0.0, 0
        for batch in inputs.eval_iterator(config, config.data.eval_files, builder):
            batch = {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}
            margin = self.logps(params, batch) - self.logps(ref_params, batch)  # [NG, K]
            diff = np.asarray(margin[:, 0] - margin[:, 1])  # chosen − rejected, [NG]
            valid = np.asarray(batch["group_mask"] & batch["response_mask"].all(-1))
            wins += float(np.sum(np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))[valid]))
            total += int(valid.sum())
        return wins / max(total, 1)

    def kl(self, params: Any, ref_params: Any, key: jax.Array, *, samples: int = 4) -> float:
        """``E_{y~π}[log π(y|x) − log π_ref(y|x)]`` over the held-out prompts, ``samples``
        responses per prompt drawn from π at temperature 1."""
        tok = self.run.tokenizer
        prompts = np.repeat(self.tokens, samples, axis=0)  # [P·samples, W]
        prompt_mask = np.repeat(self.mask, samples, axis=0)
        model = nnx.merge(self.run.graphdef, params)
        out = generate(model, prompts, prompt_mask, max_new_tokens=self.max_new_tokens,
                       key=key, temperature=1.0, eos_token_id=tok.eos_id)
        tokens = jnp.concatenate([prompts, out.tokens], axis=1)  # [B, W + new]
        mask = jnp.concatenate([prompt_mask, out.mask], axis=1)
        scored = jnp.concatenate([jnp.zeros_like(prompt_mask), out.mask], axis=1)
        gap = (_sampled_logps(self.run.graphdef, params, tokens, mask, scored)
               - _sampled_logps(self.run.graphdef, ref_params, tokens, mask, scored))  # [B]
        return float(jnp.mean(gap))


@functools.partial(jax.jit, static_argnames="graphdef")
def _sampled_logps(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, mask: jax.Array,
                   scored: jax.Array) -> jax.Array:
    """``log p(scored tokens)`` per row ``[B]`` of ragged rows ``tokens [B, L]`` (``mask``:
    real tokens, contiguous within a row; ``scored``: those whose log-prob counts)."""
    model = nnx.merge(graphdef, params)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)  # [B, L]
    zeros = jnp.zeros_like(tokens)
    hidden = model.hidden(tokens, positions, mask.astype(jnp.int32), zeros, zeros)  # [B, L, D]
    logp = jax.nn.log_softmax(model.logits(hidden[:, :-1]), axis=-1)  # [B, L-1, V]
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, L-1]
    return jnp.sum(jnp.where(scored[:, 1:], picked, 0.0), axis=-1)
