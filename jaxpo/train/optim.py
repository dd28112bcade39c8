"""The optax optimiser of a run: AdamW/SGD/Adafactor, warmup + decay, clipping, accumulation.

    tx, schedule = make_optimizer(config.optim, total_steps=config.train.steps)

The chain is ``clip_by_global_norm → optimiser(schedule)`` inside ``optax.apply_if_finite``:
an update whose gradients are not finite is dropped (params and moments unchanged) and counted
in the optimiser state, which the loop reads to stop a run that keeps failing. Gradient
accumulation happens inside the jitted step (a scan over micro-batches), so ``schedule(n)`` is
the learning rate of the ``n``-th update, what the metrics call ``learning_rate``. Weight decay
applies to matrices only (``ndim >= 2``), not to norm scales or biases.

>>> from jaxpo.config import OptimConfig
>>> tx, schedule = make_optimizer(OptimConfig(learning_rate=1.0, warmup_steps=2), total_steps=6)
>>> [round(float(schedule(n)), 3) for n in range(7)]
[0.0, 0.5, 1.0, 0.854, 0.5, 0.146, 0.0]
"""

from __future__ import annotations

import jax
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


def make_optimizer(
    cfg: OptimConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The run's optimiser and its learning-rate schedule.

    Args:
        cfg: ``config.optim``.
        total_steps: optimiser updates in the run (``config.train.steps``).

    Returns:
        ``(tx, schedule)``: an optax transformation and ``schedule(update_index) -> lr``.
    """
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(_base(cfg, schedule))
    # The loop stops long before this many consecutive failures (train.max_skipped_steps);
    # apply_if_finite would apply a non-finite update after it.
    tx = optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=2**30)
    return tx, schedule
