"""The optimiser chain: schedules, AdamW/SGD/Adafactor updates, clipping, and the
``apply_if_finite`` wrapper that drops non-finite updates. (Gradient accumulation is no longer
part of the chain: the train step scans over micro-batches, see tests/test_train_step.py.)"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpo.config import OptimConfig
from jaxpo.train.optim import make_optimizer, make_schedule


def _expected_lr(n, *, peak, warmup, total, kind):
    if n < warmup:
        return peak * n / warmup
    t = min((n - warmup) / max(total - warmup, 1), 1.0)
    if kind == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * t))
    if kind == "linear":
        return peak * (1 - t)
    return peak


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedule_matches_formula(kind, warmup):
    cfg = OptimConfig(learning_rate=0.5, warmup_steps=warmup, schedule=kind)
    schedule = make_schedule(cfg, total_steps=10)
    got = [float(schedule(n)) for n in range(12)]
    want = [_expected_lr(n, peak=0.5, warmup=warmup, total=10, kind=kind) for n in range(12)]
    np.testing.assert_allclose(got, want, atol=1e-7)


def _params():
    return {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.1, -0.1])}


def _grads():
    return {"w": jnp.array([[0.3, -0.1], [0.2, 0.4]]), "b": jnp.array([0.05, -0.2])}


def test_adamw_first_step_matches_numpy():
    cfg = OptimConfig(learning_rate=0.1, weight_decay=0.01, schedule="constant",
                      max_grad_norm=0.0)
    tx, _ = make_optimizer(cfg, total_steps=5)
    params, grads = _params(), _grads()
    updates, _ = tx.update(grads, tx.init(params), params)
    for name in params:
        g, p = np.asarray(grads[name]), np.asarray(params[name])
        m, v = 0.1 * g / (1 - 0.9), 0.001 * g * g / (1 - 0.999)  # bias-corrected moments
        step = m / (np.sqrt(v) + 1e-8)
        decay = 0.01 * p if p.ndim >= 2 else 0.0  # matrices only
        np.testing.assert_allclose(updates[name], -0.1 * (step + decay), rtol=1e-5)


def test_global_norm_clipping():
    cfg = OptimConfig(name="sgd", b1=0.0, learning_rate=1.0, schedule="constant",
                      max_grad_norm=0.5)
    tx, _ = make_optimizer(cfg, total_steps=1)
    params, grads = _params(), _grads()
    norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
    updates, _ = tx.update(grads, tx.init(params), params)
    for name in grads:
        np.testing.assert_allclose(updates[name], -np.asarray(grads[name]) * 0.5 / norm,
                                   rtol=1e-6)


def test_sgd_momentum_two_steps():
    cfg = OptimConfig(name="sgd", b1=0.9, learning_rate=0.1, schedule="constant",
                      max_grad_norm=0.0)
    tx, _ = make_optimizer(cfg, total_steps=2)
    params, grads = _params(), _grads()
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["w"], -0.1 * 1.9 * np.asarray(grads["w"]), rtol=1e-6)


def test_grad_accum_steps_is_not_in_the_chain():
    """Every ``tx.update`` is one optimiser update whatever ``grad_accum_steps`` says: the
    step averages the micro-batches' gradients before calling it (no optax.MultiSteps)."""
    base = OptimConfig(name="sgd", b1=0.0, learning_rate=1.0, schedule="constant",
                       max_grad_norm=0.0)
    tx1, _ = make_optimizer(base, total_steps=1)
    tx2, _ = make_optimizer(OptimConfig(**{**base.__dict__, "grad_accum_steps": 2}), 1)
    params, grads = _params(), _grads()
    want, _ = tx1.update(grads, tx1.init(params), params)
    got, _ = tx2.update(grads, tx2.init(params), params)
    for name in params:
        np.testing.assert_allclose(got[name], -np.asarray(grads[name]), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))


def test_nonfinite_update_is_dropped_and_counted():
    """make_optimizer wraps the chain in optax.apply_if_finite: a NaN gradient gives a zero
    update, leaves the moments as they were and is counted; a finite one resets the streak."""
    cfg = OptimConfig(learning_rate=0.1, schedule="constant", max_grad_norm=1.0)
    tx, _ = make_optimizer(cfg, total_steps=5)
    params, grads = _params(), _grads()
    state = tx.init(params)
    _, state = tx.update(grads, state, params)  # one good update: non-zero moments
    moments = [np.asarray(x) for x in jax.tree.leaves(state.inner_state)]
    bad = {**grads, "b": jnp.array([jnp.nan, 0.0])}
    for n in (1, 2):
        updates, state = tx.update(bad, state, params)
        assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates))
        assert int(state.notfinite_count) == n and int(state.total_notfinite) == n
        for a, b in zip(jax.tree.leaves(state.inner_state), moments):
            np.testing.assert_array_equal(np.asarray(a), b)
    updates, state = tx.update(grads, state, params)
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 2
    assert all(np.isfinite(np.asarray(u)).all() and np.asarray(u).any()
               for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_each_optimizer_descends_a_quadratic(name):
    cfg = OptimConfig(name=name, learning_rate=0.05, schedule="constant", b1=0.9)
    tx, _ = make_optimizer(cfg, total_steps=50)
    target = jnp.arange(2.0, 8.0).reshape(2, 3)
    params = {"w": jnp.ones((2, 3))}  # not 0: Adafactor's steps are relative to the scale
    loss = lambda p: jnp.sum((p["w"] - target) ** 2)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), state

    start = float(loss(params))
    for _ in range(50):
        params, state = step(params, state)
    assert float(loss(params)) < 0.5 * start
