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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxpo import losses
from jaxpo.models.logprobs import ResponseLogps, response_logps, token_logps
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
    if objective.level != "sequence":
        raise ValueError(f"loss {objective.name!r} is token-level (per-token KL/log-probs): "
                         "not supported by the trainer yet")
    if kind is not None and kind not in objective.kinds:
        raise ValueError(f"loss {objective.name!r} trains on {list(objective.kinds)} data, "
                         f"but the data is of kind {kind!r}")


def sequence_logps(graphdef: nnx.GraphDef, params: Any, batch: Batch, *, num_nodes: int,
                   chunk_size: int) -> ResponseLogps:
    """Response and step log-probs of a packed batch under ``params``.

    Returns:
      :class:`ResponseLogps` with ``[NG, K]`` sums/counts and ``[NG, K, M]`` per step.
    """
    model = nnx.merge(graphdef, params)
    hidden = model.hidden(batch["tokens"], batch["positions"], batch["segment"],
                          batch["node_pre"], batch["node_last"])  # [R, S, D]
    logps = token_logps(hidden, model.unembedding(), batch["tokens"], batch["pred_index"],
                        chunk_size=min(chunk_size, batch["tokens"].shape[1]))  # [R, S]
    return response_logps(logps, batch["node_slot"], batch["pred_index"],
                          batch["response_nodes"], num_nodes)


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
                batch: Batch) -> losses.LossInputs:
    """The :class:`jaxpo.losses.LossInputs` every objective reads."""
    nodes = batch["response_nodes"]  # [NG, K, M]
    response_mask = batch["response_mask"].astype(bool)  # [NG, K]
    group_mask = batch["group_mask"].astype(bool)  # [NG]
    step_mask = (nodes >= 0) & response_mask[..., None]  # [NG, K, M]
    # Steps that are the same tree node in two responses are identical (similarity 1).
    same = (nodes[:, :, None, :] == nodes[:, None, :, :]) & (nodes[:, :, None, :] >= 0)
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
        step_similarity=same.astype(jnp.float32),
        kto_kl=kto_kl,
    )


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
    ref_fn = reference_fn(reference_mode, graphdef, num_nodes=num_nodes, chunk_size=chunk_size)

    def loss_fn(params, ref_params, batch):
        policy = sequence_logps(graphdef, params, batch, num_nodes=num_nodes,
                                chunk_size=chunk_size)
        inputs = loss_inputs(policy, ref_fn(ref_params, batch), batch)
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
    ref_fn = reference_fn(reference_mode, graphdef, num_nodes=num_nodes, chunk_size=chunk_size)

    def step(params, ref_params, batch):
        ctx = use_rules(mesh, rules) if mesh is not None else contextlib.nullcontext()
        with ctx:
            policy = sequence_logps(graphdef, params, batch, num_nodes=num_nodes,
                                    chunk_size=chunk_size)
            inputs = loss_inputs(policy, ref_fn(ref_params, batch), batch)
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
