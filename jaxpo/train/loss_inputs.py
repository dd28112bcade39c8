"""From a packed batch to the :class:`jaxpo.losses.LossInputs` of an objective.

Axis layout (docs/architecture.md §2): ``R`` rows of ``S`` tokens, ``N`` node slots per row,
``NG`` group slots of ``K`` responses with ``M`` steps each.

The objective says what it reads (:attr:`jaxpo.losses.Objective.needs`); :func:`batch_inputs`
computes exactly that and nothing more:

- always the policy's response log-probs ``[NG, K]`` and step log-probs ``[NG, K, M]``;
- ``reference_logps``: the frozen reference model on the same batch under ``stop_gradient``
  (``reference_mode="model"``), or ``batch["ref_logps"]`` (``"precomputed"``);
- token arrays ``[NG, K, T]`` (``policy_token_logps``, ``token_kl``, ...) for token-level
  objectives: one chunked pass over the vocabulary gives the policy's token log-probs,
  ``log Σ_v p_v²`` and, with the reference model, its token log-probs and ``KL(π_ref ‖ π_θ)``;
- ``step_similarity`` ``[NG, K, K, M]`` (TPO) from the policy's hidden states, only when
  responses have more than one step;
- ``kto_kl``: KTO's reference point, the batch mean policy − reference log-ratio;
- ``rewards`` ``[NG, K]`` instead of any log-prob, for a reward-model objective: the model's
  scalar head at each response's last token (:func:`response_rewards`).

Running statistics (BCO's ``reward_mean``) live in the train state; the step fills them in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpo import losses
from jaxpo.models import lora
from jaxpo.models.logprobs import (
    ResponseLogps,
    gather_steps,
    node_sums,
    response_logps,
    token_logps,
    token_stats,
)

Batch = Mapping[str, jax.Array]
# Batch entries the step reads (others, e.g. group_id, stay on the host).
BATCH_KEYS = ("tokens", "positions", "segment", "node_pre", "node_last", "pred_index",
              "node_slot", "response_nodes", "scores", "response_mask", "group_mask")
REFERENCE_KEYS = ("ref_logps", "ref_step_logps")
REWARD_KEYS = ("margin",)  # a reward model's batches also carry each pair's margin [NG]
_TOKEN_NAMES = {"logps": "policy_token_logps", "log_sq": "token_log_sum_sq_probs",
                "ref_logps": "reference_token_logps", "kl": "token_kl"}


@dataclasses.dataclass(frozen=True)
class LogpSpec:
    """How log-probs are computed from a batch, fixed for a run.

    Attributes:
      graphdef: the policy's static structure (the reference shares it).
      num_nodes: ``N``, node slots per row of the batches.
      chunk_size: sequence positions per log-prob chunk (no ``[R, S, V]`` logits).
      reference_mode: ``model``, ``precomputed`` or ``none``.
      mismatched_kl: KTO's reference point from the batch's mismatched pairs (``kl_*``
        arrays, :mod:`jaxpo.data.mismatched`) instead of its own pairs.
      base_graphdef: with LoRA adapters, the base model's structure (``graphdef`` is the
        adapted model's): the trained params are the adapters, the step's frozen params the
        base weights, and the reference is the base model (adapters off). None without LoRA.
    """

    graphdef: nnx.GraphDef
    num_nodes: int
    chunk_size: int = 256
    reference_mode: str = "model"
    mismatched_kl: bool = False
    base_graphdef: nnx.GraphDef | None = None

    @property
    def reference_graphdef(self) -> nnx.GraphDef:
        """The reference model's structure: the base model with LoRA, else the policy's."""
        return self.graphdef if self.base_graphdef is None else self.base_graphdef

    def policy_params(self, params: Any, frozen: Any) -> Any:
        """The policy's params for ``graphdef``: ``params``, or with LoRA the frozen base
        weights and the adapters ``params`` together (only the adapters get gradients)."""
        return params if self.base_graphdef is None else lora.combine(frozen, params)


def forward(graphdef: nnx.GraphDef, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """``(hidden [R, S, D], unembedding [V, D])`` of a packed batch under ``params``."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden(batch["tokens"], batch["positions"], batch["segment"],
                          batch["node_pre"], batch["node_last"])  # [R, S, D]
    return hidden, model.unembedding()


def sequence_logps(graphdef: nnx.GraphDef, params: Any, batch: Batch, *, num_nodes: int,
                   chunk_size: int) -> ResponseLogps:
    """Response and step log-probs of a packed batch under ``params``.

    Returns:
      :class:`ResponseLogps` with ``[NG, K]`` sums/counts and ``[NG, K, M]`` per step.
    """
    hidden, unembedding = forward(graphdef, params, batch)
    logps = token_logps(hidden, unembedding, batch["tokens"], batch["pred_index"],
                        chunk_size=min(chunk_size, batch["tokens"].shape[1]))  # [R, S]
    return response_logps(logps, batch["node_slot"], batch["pred_index"],
                          batch["response_nodes"], num_nodes)


def response_rewards(graphdef: nnx.GraphDef, params: Any, batch: Batch, *, num_nodes: int
                     ) -> jax.Array:
    """A reward model's reward of each response of a packed batch ``[NG, K]`` (0 for padding).

    The reward is the scalar head (:meth:`jaxpo.models.Transformer.reward`) on the final-normed
    hidden state of the response's last token that is not the padding token
    (``config.pad_token_id``): in the last step (the leaf node) on its path, which has seen the
    prompt and the whole response in every layout. This is where Hugging Face's
    ``*ForSequenceClassification`` reads a row (its rightmost non-padding token), so a
    tokenizer whose padding token is its end-of-sequence token (TRL's default when there is
    none) is read at the token before the closing EOS, and any other at the EOS. A response
    made only of padding tokens is read at its last token.
    """
    model = nnx.merge(graphdef, params)
    hidden = model.hidden(batch["tokens"], batch["positions"], batch["segment"],
                          batch["node_pre"], batch["node_last"])  # [R, S, D]
    values = model.reward(hidden)  # [R, S] fp32
    seq = values.shape[1]
    valid = batch["pred_index"] >= 0  # [R, S] scored (response) tokens
    positions = jnp.arange(seq, dtype=jnp.int32)[None, :]

    def row_ends(i, s):
        return jax.ops.segment_max(i, s, num_segments=num_nodes)  # [N]

    def node_ends(mask):  # [R * N] last position of each node where mask holds, else -1
        index = jnp.where(mask, positions, -1)
        return jnp.maximum(jax.vmap(row_ends)(index, batch["node_slot"]).reshape(-1), -1)

    ends = node_ends(valid)
    pad = model.config.pad_token_id
    if pad is not None:
        readable = node_ends(valid & (batch["tokens"] != pad))
        ends = jnp.where(readable >= 0, readable, ends)
    nodes = batch["response_nodes"]  # [NG, K, M], the path's real steps first
    depth = jnp.maximum(jnp.sum(nodes >= 0, axis=-1) - 1, 0)  # [NG, K]
    leaf = jnp.take_along_axis(nodes, depth[..., None], axis=-1)[..., 0]  # [NG, K]
    end = ends[jnp.maximum(leaf, 0)]  # [NG, K]
    real = batch["response_mask"].astype(bool) & (leaf >= 0) & (end >= 0)
    flat = jnp.maximum(leaf, 0) // num_nodes * seq + jnp.maximum(end, 0)  # into [R * S]
    return jnp.where(real, values.reshape(-1)[flat], 0.0)


def reward_inputs(spec: LogpSpec, params: Any, batch: Batch) -> losses.LossInputs:
    """The :class:`jaxpo.losses.LossInputs` of a reward model on ``batch``: ``rewards``
    ``[NG, K]`` and no log-probs (its head has no next-token distribution); the pairs'
    ``margin`` ``[NG]`` when the batch carries it."""
    rewards = response_rewards(spec.graphdef, params, batch, num_nodes=spec.num_nodes)
    counts = gather_steps(_node_counts(batch, spec.num_nodes), batch["response_nodes"])
    return losses.LossInputs(
        policy_logps=None,
        rewards=rewards,
        scores=batch["scores"].astype(jnp.float32),
        num_tokens=jnp.sum(counts, axis=-1),  # [NG, K]
        response_mask=batch["response_mask"].astype(bool),
        group_mask=batch["group_mask"].astype(bool),
        reward_margin=batch["margin"].astype(jnp.float32) if "margin" in batch else None,
    )


def _node_counts(batch: Batch, num_nodes: int) -> jax.Array:
    """Scored tokens per node ``[R * N]`` (float32)."""
    valid = batch["pred_index"] >= 0  # [R, S]
    return node_sums(jnp.ones(valid.shape), batch["node_slot"], valid, num_nodes)


def step_similarity(hidden: jax.Array, batch: Batch, num_nodes: int) -> jax.Array:
    """TPO's step similarity ``S [NG, K, K, M]``, under stop-gradient.

    ``S[g, i, j, m]`` is the cosine similarity of the mean policy hidden states (over the
    node's scored tokens) of step ``m`` of responses ``i`` and ``j``, clipped to ``[0, 1]``;
    exactly 1 where the step is the same tree node in both, 0 where either step is missing.

    Args:
      hidden: policy hidden states ``[R, S, D]``.
      batch: the packed batch (``node_slot``, ``pred_index``, ``response_nodes``).
      num_nodes: ``N``, node slots per row.
    """
    hidden = jax.lax.stop_gradient(hidden).astype(jnp.float32)
    valid = batch["pred_index"] >= 0  # [R, S]
    hidden = jnp.where(valid[..., None], hidden, 0.0)

    def row_sums(h, s):
        return jax.ops.segment_sum(h, s, num_segments=num_nodes)  # [N, D]

    sums = jax.vmap(row_sums)(hidden, batch["node_slot"])  # [R, N, D]
    counts = _node_counts(batch, num_nodes)  # [R * N]
    means = sums.reshape(-1, sums.shape[-1]) / jnp.maximum(counts, 1.0)[:, None]  # [R * N, D]
    nodes = batch["response_nodes"]  # [NG, K, M]
    steps = means[jnp.maximum(nodes, 0)]  # [NG, K, M, D]
    norms = jnp.linalg.norm(steps, axis=-1, keepdims=True)
    unit = steps / jnp.maximum(norms, 1e-12)
    cosine = jnp.einsum("gimd,gjmd->gijm", unit, unit)  # [NG, K, K, M]
    real = nodes >= 0  # [NG, K, M]
    both = real[:, :, None, :] & real[:, None, :, :]  # [NG, K, K, M]
    same = (nodes[:, :, None, :] == nodes[:, None, :, :]) & both
    return jnp.where(same, 1.0, jnp.where(both, jnp.clip(cosine, 0.0, 1.0), 0.0))


def response_tokens(values: Mapping[str, jax.Array], batch: Batch, num_nodes: int,
                    length: int) -> tuple[dict[str, jax.Array], jax.Array]:
    """Gathers per-token row values into per-response token arrays.

    Response ``k`` of group ``g`` reads its steps' tokens one after the other: step ``m`` is
    node ``response_nodes[g, k, m]``, whose scored tokens are contiguous in its row from the
    node's first scored position.

    Args:
      values: name → ``[R, S]`` per-token values (0 at unscored tokens).
      batch: the packed batch (``node_slot``, ``pred_index``, ``response_nodes``,
        ``response_mask``).
      num_nodes: ``N``, node slots per row.
      length: ``T``, token positions per response (longer responses are cut).

    Returns:
      ``(name → [NG, K, T] values, 0 past the response's end; token_mask bool [NG, K, T])``.
    """
    node_slot = batch["node_slot"]
    seq = node_slot.shape[1]
    valid = batch["pred_index"] >= 0  # [R, S]
    index = jnp.where(valid, jnp.arange(seq, dtype=jnp.int32)[None, :], seq)  # [R, S]

    def row_starts(i, s):
        return jax.ops.segment_min(i, s, num_segments=num_nodes)  # [N]

    starts = jax.vmap(row_starts)(index, node_slot).reshape(-1)  # [R * N]
    counts = _node_counts(batch, num_nodes).astype(jnp.int32)  # [R * N]
    nodes = batch["response_nodes"]  # [NG, K, M]
    ids = jnp.maximum(nodes, 0)
    real = (nodes >= 0) & batch["response_mask"].astype(bool)[..., None]  # [NG, K, M]
    step_count = jnp.where(real, counts[ids], 0)  # [NG, K, M]
    step_start = jnp.where(real, starts[ids], 0)  # [NG, K, M]
    step_end = jnp.cumsum(step_count, axis=-1)  # [NG, K, M] end of each step in the response
    t = jnp.arange(length, dtype=jnp.int32)  # [T]
    step = jnp.sum(t[:, None] >= step_end[..., None, :], axis=-1)  # [NG, K, T]
    step = jnp.minimum(step, nodes.shape[-1] - 1)

    def at_step(x):  # [NG, K, M] -> [NG, K, T]
        return jnp.take_along_axis(x, step, axis=-1)

    mask = t < step_end[..., -1:]  # [NG, K, T]
    position = at_step(step_start) + t - at_step(step_end - step_count)  # [NG, K, T]
    flat = at_step(ids // num_nodes) * seq + jnp.clip(position, 0, seq - 1)
    flat = jnp.where(mask, flat, 0)  # [NG, K, T] into [R * S]
    out = {name: jnp.where(mask, v.reshape(-1)[flat], 0.0) for name, v in values.items()}
    return out, mask


def _reference(spec: LogpSpec, ref_params: Any, batch: Batch
               ) -> tuple[jax.Array, jax.Array]:
    """``(ref_logps [NG, K], ref_step_logps [NG, K, M])`` of the configured reference."""
    if spec.reference_mode == "model":
        ref = sequence_logps(spec.reference_graphdef, jax.lax.stop_gradient(ref_params), batch,
                             num_nodes=spec.num_nodes, chunk_size=spec.chunk_size)
        # The reference is frozen.
        return jax.lax.stop_gradient(ref.logps), jax.lax.stop_gradient(ref.step_logps)
    if spec.reference_mode == "precomputed":
        if "ref_logps" not in batch:
            raise ValueError("reference.mode='precomputed' but the batch has no 'ref_logps'; "
                             "run `jaxpo precompute-ref` and set reference.cache_dir")
        steps = batch.get("ref_step_logps")
        if steps is None:  # one step per response: the whole response
            steps = jnp.zeros(batch["response_nodes"].shape, jnp.float32)
            steps = steps.at[..., 0].set(batch["ref_logps"])
        return batch["ref_logps"], steps
    raise ValueError(f"reference.mode={spec.reference_mode!r} gives no reference log-probs")


def batch_inputs(spec: LogpSpec, objective: losses.Objective, params: Any, ref_params: Any,
                 batch: Batch) -> losses.LossInputs:
    """Runs the policy (and the reference) on ``batch`` and builds what ``objective`` needs.

    Args:
      spec: the run's log-prob settings.
      objective: from :func:`jaxpo.losses.build`; its ``needs`` decide what is computed.
      params: the trained params: the policy's, or with LoRA its adapters.
      ref_params: the step's frozen params: the reference (``reference_mode="model"``; with
        LoRA the base weights, which are the reference too), else None.
      batch: the packed batch (:data:`BATCH_KEYS`, plus :data:`REFERENCE_KEYS` when
        precomputed).
    """
    needs = objective.needs
    policy_params = spec.policy_params(params, ref_params)
    if "rewards" in needs:  # a reward model: no log-probs, no reference
        return reward_inputs(spec, policy_params, batch)
    hidden, unembedding = forward(spec.graphdef, policy_params, batch)  # [R, S, D], [V, D]
    tokens, pred_index = batch["tokens"], batch["pred_index"]
    chunk = min(spec.chunk_size, tokens.shape[1])
    path = (batch["node_slot"], pred_index, batch["response_nodes"], spec.num_nodes)
    wants_reference = "reference_logps" in needs
    fields: dict[str, Any] = {}
    reference = None
    if objective.level == "token":
        ref_arrays = {}
        if wants_reference and spec.reference_mode == "model":
            ref_hidden, ref_unembedding = forward(spec.reference_graphdef,
                                                  jax.lax.stop_gradient(ref_params), batch)
            ref_arrays = {"ref_hidden": ref_hidden, "ref_unembedding": ref_unembedding}
        stats = token_stats(hidden, unembedding, tokens, pred_index, chunk_size=chunk,
                            with_sq="token_log_sum_sq_probs" in needs,
                            **ref_arrays)  # each [R, S]
        policy = response_logps(stats["logps"], *path)
        if ref_arrays:  # token_stats holds the reference under stop_gradient
            ref = response_logps(stats["ref_logps"], *path)
            reference = (ref.logps, ref.step_logps)
        gathered, mask = response_tokens({_TOKEN_NAMES[k]: v for k, v in stats.items()},
                                         batch, spec.num_nodes, tokens.shape[1])  # [NG, K, T]
        fields.update({k: v for k, v in gathered.items() if k in needs}, token_mask=mask)
    else:
        logps = token_logps(hidden, unembedding, tokens, pred_index, chunk_size=chunk)  # [R, S]
        policy = response_logps(logps, *path)
    if wants_reference and reference is None:
        reference = _reference(spec, ref_params, batch)
    if "step_similarity" in needs and batch["response_nodes"].shape[-1] > 1:
        fields["step_similarity"] = step_similarity(hidden, batch, spec.num_nodes)
    if "kto_kl" in needs and spec.mismatched_kl:
        fields["kto_kl"] = mismatched_kl(spec, params, ref_params, batch)
    matched = "kto_kl" in needs and "kto_kl" not in fields
    return loss_inputs(policy, reference, batch, matched_kto_kl=matched, **fields)


def mismatched_kl(spec: LogpSpec, params: Any, ref_params: Any, batch: Batch) -> jax.Array:
    """KTO's reference point as TRL estimates it: the mean over the batch's mismatched pairs
    (``kl_*`` arrays) of ``log π_θ − log π_ref``, clamped at 0, without gradient ``[]``."""
    kl_batch = {k.removeprefix("kl_"): v for k, v in batch.items() if k.startswith("kl_")}
    if "tokens" not in kl_batch:
        raise ValueError("loss.kto_kl='mismatched' but the batch has no mismatched pairs "
                         "(kl_* arrays): build the iterator with mismatched_pairs=True")
    args = {"num_nodes": spec.num_nodes, "chunk_size": spec.chunk_size}
    policy = sequence_logps(spec.graphdef,
                            jax.lax.stop_gradient(spec.policy_params(params, ref_params)),
                            kl_batch, **args)
    ref = sequence_logps(spec.reference_graphdef, jax.lax.stop_gradient(ref_params), kl_batch,
                         **args)
    real = kl_batch["response_mask"] & kl_batch["group_mask"][:, None]  # [NG, K]
    diff = jnp.where(real, policy.logps - ref.logps, 0.0)
    mean = jnp.sum(diff) / jnp.maximum(jnp.sum(real), 1)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def loss_inputs(policy: ResponseLogps, reference: tuple[jax.Array, jax.Array] | None,
                batch: Batch, *, matched_kto_kl: bool = False, **fields: Any
                ) -> losses.LossInputs:
    """The :class:`jaxpo.losses.LossInputs` of policy (and reference) log-probs on ``batch``.

    ``fields`` are further LossInputs fields (``step_similarity [NG, K, K, M]``, token arrays
    ``[NG, K, T]``). Without a step similarity, steps that are the same tree node in two
    responses have similarity 1 and all others 0.
    """
    nodes = batch["response_nodes"]  # [NG, K, M]
    response_mask = batch["response_mask"].astype(bool)  # [NG, K]
    group_mask = batch["group_mask"].astype(bool)  # [NG]
    step_mask = (nodes >= 0) & response_mask[..., None]  # [NG, K, M]
    if "step_similarity" not in fields:
        same = (nodes[:, :, None, :] == nodes[:, None, :, :]) & (nodes[:, :, None, :] >= 0)
        fields["step_similarity"] = same.astype(jnp.float32)
    ref_logps = ref_steps = None
    if reference is not None:
        ref_logps, ref_steps = reference
        if matched_kto_kl:
            # KTO's reference point z0: the batch mean log-ratio, a constant (clamped in kto).
            real = response_mask & group_mask[:, None]
            diff = jnp.where(real, policy.logps - ref_logps, 0.0)
            fields["kto_kl"] = jax.lax.stop_gradient(jnp.sum(diff) / jnp.maximum(jnp.sum(real), 1))
    return losses.LossInputs(
        policy_logps=policy.logps,
        scores=batch["scores"].astype(jnp.float32),
        num_tokens=policy.token_counts,
        response_mask=response_mask,
        group_mask=group_mask,
        reference_logps=ref_logps,
        policy_step_logps=policy.step_logps,
        reference_step_logps=ref_steps,
        step_mask=step_mask,
        **fields,
    )
