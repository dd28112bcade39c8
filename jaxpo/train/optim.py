"""The optax optimiser of a run: AdamW/SGD/Adafactor, warmup + decay, clipping, accumulation.

    tx, schedule = make_optimizer(config.optim, total_steps=config.train.steps)

The chain is ``clip_by_global_norm → optimiser(schedule)`` inside ``optax.apply_if_finite``:
an update whose gradients are not finite is dropped (params and moments unchanged) and counted
in the optimiser state, which the loop reads to stop a run that keeps failing. Gradient
accumulation happens inside the jitted step (a scan over micro-batches), so ``schedule(n)`` is
the learning rate of the ``n``-th update, what the metrics call ``learning_rate``. Weight decay
applies to matrices only (``ndim >= 2``), not to norm scales or biases.

Low-precision parameters (``model.param_dtype=bfloat16``) get fp32 master weights
(:func:`with_master_weights`): bf16 has 8 significant bits, so an update smaller than half a
unit in the last place of a weight (about 0.2% of it) rounds away. At a learning rate of 1e-6,
10 AdamW updates of bf16 weights change 1.9% of them, against 99.99% in fp32. The optimiser
state holds an fp32 copy of the parameters that the updates accumulate in, the moments are
fp32, and the bf16 parameters are that copy rounded after every update. Cost: 4 more bytes per
parameter (bf16 params 2 + master 4 + AdamW moments 8 = 14 bytes, against 16 for fp32 params).

>>> from jaxpo.config import OptimConfig
>>> tx, schedule = make_optimizer(OptimConfig(learning_rate=1.0, warmup_steps=2), total_steps=6)
>>> [round(float(schedule(n)), 3) for n in range(7)]
[0.0, 0.5, 1.0, 0.854, 0.5, 0.146, 0.0]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxpo.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then the decay to 0.

    Args:
        cfg: the optimiser config (``learning_rate``, ``warmup_steps``, ``schedule``).
        total_steps: optimiser updates in the run, warmup included.

    Returns:
        ``schedule(update_index) -> learning rate``.
    """
    peak = cfg.learning_rate
    warmup = min(cfg.warmup_steps, max(total_steps, 0))
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=0.0)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    ramp = optax.linear_schedule(0.0, peak, warmup)
    return optax.join_schedules([ramp, after], boundaries=[warmup])


def _matrices(params) -> object:
    """Weight-decay mask: True for parameters with ndim >= 2."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def _base(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    decay = cfg.weight_decay
    if cfg.name == "adamw":
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=decay,
                           mask=_matrices)
    if cfg.name == "sgd":
        sgd = optax.sgd(schedule, momentum=cfg.b1 or None)
        if decay == 0.0:
            return sgd
        return optax.chain(optax.add_decayed_weights(decay, mask=_matrices), sgd)
    if cfg.name == "adafactor":
        return optax.adafactor(schedule, weight_decay_rate=decay or None,
                               weight_decay_mask=_matrices)
    raise ValueError(f"config.optim.name={cfg.name!r}; choose from ['adamw', 'sgd', 'adafactor']")


class MasterState(NamedTuple):
    """State of :func:`with_master_weights`: the fp32 ``master`` params and the inner state."""

    master: Any
    inner: Any


def with_master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``inner`` on an fp32 master copy of the params, so small updates are not lost.

    Works on any params pytree (the policy, adapters, a reward head): ``master`` has the params'
    structure (nnx Variables keep their sharding metadata, so the copy is sharded like its
    parameter). Gradients are cast to fp32 before ``inner`` (its moments are fp32 too), the
    update is applied to the master, and the returned update (in the parameter's dtype) takes
    each parameter to its master rounded to that dtype: the difference of two bf16 numbers
    within a factor of 2 of each other is exact in bf16 (Sterbenz), so adding it is exact. Where
    it is not (a sign change), the parameter lands within an ulp of the rounded master, and the
    next update starts from the master again: rounding never accumulates.

    >>> tx = with_master_weights(optax.sgd(1e-3))
    >>> p = jnp.ones(4, jnp.bfloat16)
    >>> state = tx.init(p)
    >>> for _ in range(10):  # each step (1e-3) is under half a bf16 ulp below 1.0 (2e-3)
    ...     u, state = tx.update(jnp.ones(4, jnp.bfloat16), state, p)
    ...     p = optax.apply_updates(p, u)
    >>> round(float(state.master[0]), 5), float(p[0])  # 1 - 10 * 1e-3; the nearest bf16
    (0.99, 0.98828125)
    """

    def to_f32(tree):
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)

    def init(params):
        master = to_f32(params)
        return MasterState(master=master, inner=inner.init(master))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("with_master_weights: update() needs the params")
        steps, inner_state = inner.update(to_f32(updates), state.inner, state.master)
        master = optax.apply_updates(state.master, steps)
        delta = jax.tree.map(
            lambda m, p: (m.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32)
                          ).astype(p.dtype), master, params)
        return delta, MasterState(master=master, inner=inner_state)

    return optax.GradientTransformation(init, update)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, *, master_weights: bool = False
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The run's optimiser and its learning-rate schedule.

    Args:
        cfg: ``config.optim``.
        total_steps: optimiser updates in the run (``config.train.steps``).
        master_weights: keep fp32 master weights (:func:`with_master_weights`); what a run
            with ``model.param_dtype=bfloat16`` uses.

    Returns:
        ``(tx, schedule)``: an optax transformation and ``schedule(update_index) -> lr``.
    """
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(_base(cfg, schedule))
    chain = optax.chain(*parts)
    if master_weights:
        chain = with_master_weights(chain)
    # The loop stops long before this many consecutive failures (train.max_skipped_steps);
    # apply_if_finite would apply a non-finite update after it.
    tx = optax.apply_if_finite(chain, max_consecutive_errors=2**30)
    return tx, schedule
