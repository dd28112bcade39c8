"""The train step: one ``jax.jit`` that runs the policy and the frozen reference, the objective
passed in, ``value_and_grad`` and the optax update.

Axis layout (docs/architecture.md §2): ``R`` rows of ``S`` tokens, ``N`` node slots per row,
``NG`` group slots of ``K`` responses with ``M`` steps each.

The objective is data, not a flag: the step takes any :class:`jaxpo.losses.Objective` and
its hyperparameters, and builds the same :class:`jaxpo.losses.LossInputs` for every one. The
reference is chosen once, outside the step, as a function of ``(ref_params, batch)``:

- ``model``: the frozen initial params run on the same batch under ``stop_gradient``;
- ``precomputed``: ``batch["ref_logps"]`` (and ``batch["ref_step_logps"]`` when present);
- ``none``: no reference (reference-free objectives only).

Token-level objectives (``objective.level == "token"``: ``tdpo``, ``sparse_po``, and any
objective wrapped by :func:`jaxpo.losses.with_wpo` / :func:`jaxpo.losses.with_ld`) also get
per-response token arrays ``[NG, K, T]`` (``T = S``, the row length): one chunked pass over the
vocabulary gives the policy's token log-probs, ``log Σ_v p_v²`` and, with the reference model,
its token log-probs and ``KL(π_ref ‖ π_θ)``; each response's tokens are gathered from its rows,
step after step. TPO gets the step similarity of :func:`step_similarity`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxpo import losses
from jaxpo.models.logprobs import ResponseLogps, node_sums, response_logps, token_logps, token_stats
from jaxpo.sharding.logical import Rules, use_rules
from jaxpo.train.state import TrainState

Batch = Mapping[str, jax.Array]
REFERENCE_MODES = ("model", "precomputed", "none")
# Batch entries the step reads (others, e.g. group_id, stay on the host).
BATCH_KEYS = ("tokens", "positions", "segment", "node_pre", "node_last", "pred_index",
              "node_slot", "response_nodes", "scores", "response_mask", "group_mask")
OPTIONAL_KEYS = ("ref_logps", "ref_step_logps")


def check_objective(objective: losses.Objective, reference_mode: str, kind: str | None) -> None:
    """Raises ``ValueError`` when the trainer cannot run ``objective`` as configured."""
    if reference_mode not in REFERENCE_MODES:
        raise ValueError(f"reference.mode={reference_mode!r}; choose from {REFERENCE_MODES}")
    if objective.needs_reference and reference_mode == "none":
        raise ValueError(
            f"loss {objective.name!r} needs a reference model, but reference.mode='none'; "
            "set --config.reference.mode=model (or precomputed), or choose a reference-free "
            "loss (simpo, orpo, cpo, triple_po, pro)")
    if objective.level == "token" and objective.needs_reference and reference_mode != "model":
        raise ValueError(
            f"loss {objective.name!r} is token-level: it needs the reference model's per-token "
            f"distributions (KL, token log-probs), but reference.mode={reference_mode!r}; "
            "set --config.reference.mode=model")
    if kind is not None and kind not in objective.kinds:
        raise ValueError(f"loss {objective.name!r} trains on {list(objective.kinds)} data, "
                         f"but the data is of kind {kind!r}")


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


def reference_fn(mode: str, graphdef: nnx.GraphDef, *, num_nodes: int, chunk_size: int
                 ) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array] | None]:
    """``fn(ref_params, batch) -> (ref_logps [NG, K], ref_step_logps [NG, K, M]) | None``."""
    if mode == "model":
        def from_model(ref_params, batch):
            ref = sequence_logps(graphdef, jax.lax.stop_gradient(ref_params), batch,
                                 num_nodes=num_nodes, chunk_size=chunk_size)
            # The reference is frozen.
            return jax.lax.stop_gradient(ref.logps), jax.lax.stop_gradient(ref.step_logps)
        return from_model
    if mode == "precomputed":
        def from_batch(ref_params, batch):
            if "ref_logps" not in batch:
                raise ValueError("reference.mode='precomputed' but the batch has no 'ref_logps'"
                                 "; run `jaxpo precompute-ref` and set reference.cache_dir")
            steps = batch.get("ref_step_logps")
            if steps is None:  # one step per response: the whole response
                steps = jnp.zeros(batch["response_nodes"].shape, jnp.float32)
                steps = steps.at[..., 0].set(batch["ref_logps"])
            return batch["ref_logps"], steps
        return from_batch
    if mode == "none":
        return lambda ref_params, batch: None
    raise ValueError(f"reference.mode={mode!r}; choose from {REFERENCE_MODES}")


def loss_inputs(policy: ResponseLogps, reference: tuple[jax.Array, jax.Array] | None,
                batch: Batch, *, similarity: jax.Array | None = None,
                tokens: Mapping[str, jax.Array] | None = None) -> losses.LossInputs:
    """The :class:`jaxpo.losses.LossInputs` every objective reads.

    ``similarity`` is the step similarity ``[NG, K, K, M]`` (default: 1 where a step is the
    same tree node in both responses, else 0). ``tokens`` holds the token-level fields of
    LossInputs (``policy_token_logps``, ``token_mask``, ...), each ``[NG, K, T]``.
    """
    nodes = batch["response_nodes"]  # [NG, K, M]
    response_mask = batch["response_mask"].astype(bool)  # [NG, K]
    group_mask = batch["group_mask"].astype(bool)  # [NG]
    step_mask = (nodes >= 0) & response_mask[..., None]  # [NG, K, M]
    if similarity is None:
        # Steps that are the same tree node in two responses are identical (similarity 1).
        same = (nodes[:, :, None, :] == nodes[:, None, :, :]) & (nodes[:, :, None, :] >= 0)
        similarity = same.astype(jnp.float32)
    ref_logps = ref_steps = kto_kl = None
    if reference is not None:
        ref_logps, ref_steps = reference
        # KTO's reference point z0: the batch mean implicit reward, a constant (clamped in kto).
        real = response_mask & group_mask[:, None]
        diff = jnp.where(real, policy.logps - ref_logps, 0.0)
        kto_kl = jax.lax.stop_gradient(jnp.sum(diff) / jnp.maximum(jnp.sum(real), 1))
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
        step_similarity=similarity,
        kto_kl=kto_kl,
        **dict(tokens or {}),
    )


def uses_step_similarity(objective: losses.Objective) -> bool:
    """Whether ``objective`` reads the hidden-state step similarity (TPO, alone or combined)."""
    return re.search(r"\btpo\b", objective.name) is not None


def batch_inputs(graphdef: nnx.GraphDef, objective: losses.Objective, params: Any,
                 ref_params: Any, batch: Batch, *, reference_mode: str, num_nodes: int,
                 chunk_size: int) -> losses.LossInputs:
    """Runs the policy (and the reference) on ``batch`` and builds ``objective``'s inputs.

    Token arrays are computed only for a token-level objective, the hidden-state step
    similarity only for TPO.
    """
    hidden, unembedding = forward(graphdef, params, batch)  # [R, S, D], [V, D]
    tokens, pred_index = batch["tokens"], batch["pred_index"]
    chunk = min(chunk_size, tokens.shape[1])
    token_fields = None
    if objective.level == "token":
        ref_arrays = {}
        if reference_mode == "model":
            ref_hidden, ref_unembedding = forward(graphdef, jax.lax.stop_gradient(ref_params),
                                                  batch)
            ref_arrays = {"ref_hidden": ref_hidden, "ref_unembedding": ref_unembedding}
        stats = token_stats(hidden, unembedding, tokens, pred_index, chunk_size=chunk,
                            with_sq=True, **ref_arrays)  # each [R, S]
        args = (batch["node_slot"], pred_index, batch["response_nodes"], num_nodes)
        policy = response_logps(stats["logps"], *args)
        if ref_arrays:  # token_stats holds the reference under stop_gradient
            ref = response_logps(stats["ref_logps"], *args)
            reference = (ref.logps, ref.step_logps)
        else:
            reference = reference_fn(reference_mode, graphdef, num_nodes=num_nodes,
                                     chunk_size=chunk_size)(ref_params, batch)
        names = {"logps": "policy_token_logps", "log_sq": "token_log_sum_sq_probs",
                 "ref_logps": "reference_token_logps", "kl": "token_kl"}
        gathered, mask = response_tokens({names[k]: v for k, v in stats.items()}, batch,
                                         num_nodes, tokens.shape[1])  # [NG, K, T]
        token_fields = {**gathered, "token_mask": mask}
    else:
        logps = token_logps(hidden, unembedding, tokens, pred_index, chunk_size=chunk)  # [R, S]
        policy = response_logps(logps, batch["node_slot"], pred_index, batch["response_nodes"],
                                num_nodes)
        reference = reference_fn(reference_mode, graphdef, num_nodes=num_nodes,
                                 chunk_size=chunk_size)(ref_params, batch)
    similarity = (step_similarity(hidden, batch, num_nodes)
                  if uses_step_similarity(objective) else None)
    return loss_inputs(policy, reference, batch, similarity=similarity, tokens=token_fields)


def make_train_step(
    graphdef: nnx.GraphDef,
    objective: losses.Objective,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    *,
    hparams: Mapping[str, Any] | None = None,
    reference_mode: str = "model",
    num_nodes: int,
    chunk_size: int = 256,
    metrics_beta: float = 0.1,
    mesh: Mesh | None = None,
    rules: Rules = (),
    state_shardings: Any = None,
    ref_shardings: Any = None,
    batch_shardings: Any = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the jitted ``train_step(state, ref_params, batch) -> (state, metrics)``.

    ``state`` is donated; ``ref_params`` (the frozen reference, or None) is not. Shardings are
    the explicit in/out shardings of the state, the reference params and the batch dict (None
    on one device). Non-finite loss or gradients leave params and optimizer state unchanged
    and add one to ``state.skipped``.

    Args:
      graphdef: the policy's static structure.
      objective: from :func:`jaxpo.losses.get` / :func:`jaxpo.losses.combine`.
      tx: the optax transformation; ``schedule(step)`` gives the logged learning rate.
      hparams: objective hyperparameter overrides.
      reference_mode: ``model``, ``precomputed`` or ``none``.
      num_nodes: ``N``, node slots per row of the batches.
      chunk_size: sequence positions per log-prob chunk.
      metrics_beta: β for the implicit-reward metrics.
      mesh, rules: activation sharding (``use_rules``) while tracing.

    Returns:
      The jitted step; metrics are float32 scalars.
    """
    hparams = dict(hparams or {})
    check_objective(objective, reference_mode, None)

    def loss_fn(params, ref_params, batch):
        inputs = batch_inputs(graphdef, objective, params, ref_params, batch,
                              reference_mode=reference_mode, num_nodes=num_nodes,
                              chunk_size=chunk_size)
        per_group = objective(inputs, **hparams)  # [NG]
        valid = inputs.group_mask
        loss = jnp.sum(jnp.where(valid, per_group, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
        return loss, inputs

    def step(state: TrainState, ref_params: Any, batch: Batch):
        ctx = use_rules(mesh, rules) if mesh is not None else contextlib.nullcontext()
        with ctx:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, inputs), grads = grad_fn(state.params, ref_params, batch)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        def keep(new, old):  # a non-finite step changes nothing but the counters
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "skipped_steps": new_state.skipped.astype(jnp.float32)}
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        metrics.update(batch_metrics(inputs, metrics_beta, objective.logps))
        return new_state, metrics

    return jax.jit(step, in_shardings=(state_shardings, ref_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=0)


class TrainStep:
    """``train_step(state, batch) -> (state, metrics)``: the jitted step with the frozen
    reference params bound (they are an argument of the compiled step, never donated, never
    baked into the program as constants).

    Args:
      jitted: from :func:`make_train_step`.
      ref_params: the reference params (``reference.mode=model``), else None.
    """

    def __init__(self, jitted: Callable[..., Any], ref_params: Any = None):
        self.jitted = jitted
        self.ref_params = ref_params

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        return self.jitted(state, self.ref_params, batch)


def make_eval_step(graphdef: nnx.GraphDef, objective: losses.Objective, *,
                   hparams: Mapping[str, Any] | None = None, reference_mode: str = "model",
                   num_nodes: int, chunk_size: int = 256, metrics_beta: float = 0.1,
                   mesh: Mesh | None = None, rules: Rules = ()
                   ) -> Callable[..., dict[str, jax.Array]]:
    """Jitted ``eval_step(params, ref_params, batch) -> metrics`` (loss and preference metrics,
    plus ``groups``, the number of real groups, for weighting batch means)."""
    hparams = dict(hparams or {})
    check_objective(objective, reference_mode, None)

    def step(params, ref_params, batch):
        ctx = use_rules(mesh, rules) if mesh is not None else contextlib.nullcontext()
        with ctx:
            inputs = batch_inputs(graphdef, objective, params, ref_params, batch,
                                  reference_mode=reference_mode, num_nodes=num_nodes,
                                  chunk_size=chunk_size)
            per_group = objective(inputs, **hparams)
        groups = jnp.sum(inputs.group_mask)
        loss = jnp.sum(jnp.where(inputs.group_mask, per_group, 0.0)) / jnp.maximum(groups, 1)
        return {"loss": loss, "groups": groups.astype(jnp.float32),
                **batch_metrics(inputs, metrics_beta, objective.logps)}

    return jax.jit(step)


def batch_metrics(inputs: losses.LossInputs, beta: float, logps: str = "sum"
                  ) -> dict[str, jax.Array]:
    """TRL-named reward/log-prob metrics and ranking metrics, float32 scalars."""
    out = losses.preference_metrics(inputs, beta, logps=logps)
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}
