"""The train and eval steps: one ``jax.jit`` each, the objective passed in.

    spec = StepSpec(logp=LogpSpec(graphdef, num_nodes=N), objective=objective, hparams=h)
    train_step = make_train_step(spec, tx)           # (state, ref_params, batch) -> (state, m)
    eval_step = make_eval_step(spec)                 # (params, ref_params, batch) -> m

The train step runs the policy and the frozen reference on a batch of ``A`` micro-batches
(arrays ``[A, ...]``, scanned with ``lax.scan``; gradients are averaged), then one optax
update: every call is one optimiser update. The update goes through
``optax.apply_if_finite``: a non-finite loss or gradient changes no parameter and no optimiser
moment, and is counted (``skipped_steps``; ``nonfinite_streak`` counts the current run of them,
which the loop stops on). The step never branches on the objective's name: it computes what
:attr:`jaxpo.losses.Objective.needs` asks for (see :mod:`jaxpo.train.loss_inputs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxpo import losses
from jaxpo.sharding.logical import Rules, use_rules
from jaxpo.train.loss_inputs import Batch, LogpSpec, batch_inputs
from jaxpo.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything a step computes, fixed for a run.

    Attributes:
      logp: how log-probs are computed (graphdef, node slots, chunk, reference mode).
      objective: from :func:`jaxpo.losses.build`.
      hparams: hyperparameter overrides to call the objective with.
      metrics_beta: β of the implicit-reward metrics (:func:`jaxpo.losses.metrics_beta`).
      mesh: activation sharding while tracing (with ``rules``); None on one device.
      rules: logical-axis rules.
    """

    logp: LogpSpec
    objective: losses.Objective
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    metrics_beta: float = 0.1
    mesh: Mesh | None = None
    rules: Rules = ()

    def rules_context(self):
        return use_rules(self.mesh, self.rules) if self.mesh is not None else (
            contextlib.nullcontext())

    def group_losses(self, params: Any, ref_params: Any, batch: Batch, stats: Mapping[str, Any]
                     ) -> tuple[jax.Array, losses.LossInputs]:
        """``(mean loss over real groups, LossInputs)`` of one (micro-)batch."""
        inputs = batch_inputs(self.logp, self.objective, params, ref_params, batch)
        if "reward_mean" in self.objective.needs:
            inputs = dataclasses.replace(inputs, reward_mean=running_reward_mean(
                stats, inputs, self.metrics_beta)[0])
        per_group = self.objective(inputs, **self.hparams)  # [NG]
        valid = inputs.group_mask
        loss = jnp.sum(jnp.where(valid, per_group, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
        return loss, inputs


def running_reward_mean(stats: Mapping[str, jax.Array], inputs: losses.LossInputs, beta: float
                        ) -> tuple[jax.Array, jax.Array]:
    """BCO's δ: the running mean of the implicit rewards ``β·r`` of every real response seen,
    this batch included (stop-gradient). Returns ``(new mean [], new count [])``."""
    real = inputs.response_mask & inputs.group_mask[:, None]  # [NG, K]
    rewards = jax.lax.stop_gradient(beta * (inputs.policy_logps - inputs.reference_logps))
    n = jnp.sum(real).astype(jnp.float32)
    total = jnp.sum(jnp.where(real, rewards, 0.0))
    count = stats["reward_count"] + n
    mean = (stats["reward_mean"] * stats["reward_count"] + total) / jnp.maximum(count, 1.0)
    return mean, count


def make_train_step(spec: StepSpec, tx: optax.GradientTransformation, *,
                    schedule: optax.Schedule | None = None, state_shardings: Any = None,
                    ref_shardings: Any = None, batch_shardings: Any = None
                    ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted ``train_step(state, ref_params, batch) -> (state, metrics)``.

    ``state`` is donated; ``ref_params`` (the frozen reference, or None) is not: it is an
    argument of the compiled step, never a constant baked into it. ``batch`` holds ``A``
    micro-batches: every array has a leading axis ``[A, ...]`` (see :func:`stack`).

    Args:
      spec: the step's spec.
      tx: the optax transformation, wrapped by :func:`jaxpo.train.optim.make_optimizer` in
        ``optax.apply_if_finite``.
      schedule: ``schedule(update) -> learning rate``, logged as ``learning_rate``.
      state_shardings, ref_shardings, batch_shardings: explicit in/out shardings (None on one
        device).

    Returns:
      The jitted step; metrics are float32 scalars (means over the micro-batches).
    """

    def train_step(state: TrainState, ref_params: Any, batch: Batch):
        def micro(carry, micro_batch):
            grads_sum, stats = carry
            grad_fn = jax.value_and_grad(spec.group_losses, has_aux=True)
            (loss, inputs), grads = grad_fn(state.params, ref_params, micro_batch, stats)
            if "reward_mean" in spec.objective.needs:
                mean, count = running_reward_mean(stats, inputs, spec.metrics_beta)
                stats = {**stats, "reward_mean": mean, "reward_count": count}
            metrics = {"loss": loss,
                       **batch_metrics(inputs, spec.metrics_beta, spec.objective.logps)}
            if inputs.kto_kl is not None:
                metrics["kl"] = jnp.mean(inputs.kto_kl).astype(jnp.float32)  # TRL's name
            grads_sum = jax.tree.map(lambda s, g: s + g.astype(s.dtype), grads_sum, grads)
            return (grads_sum, stats), metrics

        count = batch["tokens"].shape[0]
        with spec.rules_context():
            # Several micro-batches of low-precision (bf16) params sum their gradients in
            # float32, so that small ones are not rounded away; the mean is cast back.
            zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=_accum_dtype(p, count)),
                                 state.params)
            (grads, stats), metrics = jax.lax.scan(micro, (zeros, state.stats), batch)
        grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, state.params)
        metrics = jax.tree.map(jnp.mean, metrics)  # [A] -> []
        loss = metrics["loss"]
        # A non-finite loss with finite gradients is still a bad step: make apply_if_finite
        # see it in the gradients.
        grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(grad_norm)
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state,
            stats=jax.tree.map(lambda new, old: jnp.where(finite, new, old), stats,
                               state.stats))
        metrics |= {"grad_norm": grad_norm,
                    "skipped_steps": skipped(opt_state, "total_notfinite"),
                    "nonfinite_streak": skipped(opt_state, "notfinite_count")}
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        if "reward_mean" in spec.objective.needs:
            metrics["reward_mean"] = new_state.stats["reward_mean"]
        return new_state, metrics

    return jax.jit(train_step,
                   in_shardings=(state_shardings, ref_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def _accum_dtype(param: jax.Array, micro_batches: int) -> jnp.dtype:
    """The dtype gradients of ``param`` are summed in over the micro-batches: float32 for
    floating params below it when there are several, else the param's own."""
    dtype = jnp.dtype(param.dtype)
    if micro_batches > 1 and jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return dtype


def skipped(opt_state: Any, counter: str) -> jax.Array:
    """A counter of ``optax.apply_if_finite``'s state (``total_notfinite`` or
    ``notfinite_count``) as float32, 0 when the chain has none."""
    found = optax.tree_utils.tree_get(opt_state, counter, 0)
    return jnp.asarray(found, jnp.float32)


def stack(*micro_batches: Mapping[str, Any]) -> dict[str, Any]:
    """``A`` host batches → one batch of ``[A, ...]`` arrays (what the train step takes)."""
    return {k: np.stack([b[k] for b in micro_batches]) for k in micro_batches[0]}


def make_eval_step(spec: StepSpec) -> Callable[..., dict[str, jax.Array]]:
    """Jitted ``eval_step(params, ref_params, batch) -> metrics`` (loss and preference metrics,
    plus ``groups``, the number of real groups, for weighting batch means). ``batch`` is one
    batch (no micro-batch axis)."""

    def eval_step(params, ref_params, batch):
        stats = {"reward_mean": jnp.zeros((), jnp.float32),
                 "reward_count": jnp.zeros((), jnp.float32)}
        with spec.rules_context():
            loss, inputs = spec.group_losses(params, ref_params, batch, stats)
        groups = jnp.sum(inputs.group_mask)
        return {"loss": loss, "groups": groups.astype(jnp.float32),
                **batch_metrics(inputs, spec.metrics_beta, spec.objective.logps)}

    return jax.jit(eval_step)


def batch_metrics(inputs: losses.LossInputs, beta: float, logps: str = "sum"
                  ) -> dict[str, jax.Array]:
    """TRL-named reward/log-prob metrics and ranking metrics, float32 scalars (a reward
    model's accuracy, margin and reward statistics when ``logps="reward"``)."""
    if logps == "reward":
        out = losses.reward_metrics(inputs)
    else:
        out = losses.preference_metrics(inputs, beta, logps=logps)
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}
