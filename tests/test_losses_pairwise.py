"""Pairwise losses with a reference model against independent float64 numpy/scipy formulas."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.special import expit, log_expit

from jaxpo.losses._pairwise import (
    apo_down,
    apo_zero,
    bco,
    dpo,
    dpop,
    exo,
    hinge,
    ipo,
    modpo,
    nca,
    robust_dpo,
    sppo_hard,
)

LOG2 = np.log(2.0)


# --- independent numpy references (LOSSES.md formulas, float64) ---------------------------


def _ratios(pc, pr, rc, rr):
    return pc - rc, pr - rr


def np_dpo(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0):
    r_w, r_l = _ratios(pc, pr, rc, rr)
    z = beta * (r_w - r_l)
    return -(1 - label_smoothing) * log_expit(z) - label_smoothing * log_expit(-z)


def np_robust_dpo(pc, pr, rc, rr, beta=0.1, epsilon=0.1):
    r_w, r_l = _ratios(pc, pr, rc, rr)
    z = beta * (r_w - r_l)
    return (-(1 - epsilon) * log_expit(z) + epsilon * log_expit(-z)) / (1 - 2 * epsilon)


def np_ipo(pc, pr, rc, rr, beta=0.1):
    r_w, r_l = _ratios(pc, pr, rc, rr)
    return (r_w - r_l - 1 / (2 * beta)) ** 2


def np_hinge(pc, pr, rc, rr, beta=0.1):
    r_w, r_l = _ratios(pc, pr, rc, rr)
    return np.maximum(0.0, 1 - beta * (r_w - r_l))


def np_exo(pc, pr, rc, rr, beta=0.1, epsilon=1e-3):
    r_w, r_l = _ratios(pc, pr, rc, rr)
    z = beta * (r_w - r_l)
    return expit(z) * (log_expit(z) - np.log(1 - epsilon)) + expit(-z) * (
        log_expit(-z) - np.log(epsilon)
    )


def np_nca(pc, pr, rc, rr, beta=0.1):
    r_w, r_l = _ratios(pc, pr, rc, rr)
    return -log_expit(beta * r_w) - 0.5 * log_expit(-beta * r_w) - 0.5 * log_expit(-beta * r_l)


def np_bco(pc, pr, rc, rr, beta=0.1, delta=0.0):
    r_w, r_l = _ratios(pc, pr, rc, rr)
    return -log_expit(beta * r_w - delta) - log_expit(-(beta * r_l - delta))


def np_sppo_hard(pc, pr, rc, rr, beta=0.001):
    r_w, r_l = _ratios(pc, pr, rc, rr)
    return (r_w - 1 / (2 * beta)) ** 2 + (r_l + 1 / (2 * beta)) ** 2


def np_apo_zero(pc, pr, rc, rr, beta=0.1):
    r_w, r_l = _ratios(pc, pr, rc, rr)
    return (1 - expit(beta * r_w)) + expit(beta * r_l)


def np_apo_down(pc, pr, rc, rr, beta=0.1):
    r_w, r_l = _ratios(pc, pr, rc, rr)
    return expit(beta * r_w) + (1 - expit(beta * (r_w - r_l)))


def np_dpop(pc, pr, rc, rr, beta=0.1, lambda_=50.0):
    r_w, r_l = _ratios(pc, pr, rc, rr)
    return -log_expit(beta * ((r_w - r_l) - lambda_ * np.maximum(0.0, rc - pc)))


def np_modpo(pc, pr, rc, rr, mw, ml, beta=0.1, weight=1.0):
    r_w, r_l = _ratios(pc, pr, rc, rr)
    return -log_expit((beta * (r_w - r_l) - (1 - weight) * (mw - ml)) / weight)


@dataclasses.dataclass(frozen=True)
class Case:
    fn: Callable
    ref: Callable
    kwargs: dict
    n_args: int = 4

    def jax_fn(self) -> Callable:
        return functools.partial(self.fn, **self.kwargs)

    def np_fn(self) -> Callable:
        return functools.partial(self.ref, **self.kwargs)


CASES = {
    "dpo": Case(dpo, np_dpo, {}),
    "dpo_smoothed": Case(dpo, np_dpo, {"beta": 0.3, "label_smoothing": 0.2}),
    "robust_dpo": Case(robust_dpo, np_robust_dpo, {}),
    "robust_dpo_eps03": Case(robust_dpo, np_robust_dpo, {"beta": 0.5, "epsilon": 0.3}),
    "ipo": Case(ipo, np_ipo, {}),
    "hinge": Case(hinge, np_hinge, {}),
    "exo": Case(exo, np_exo, {}),
    "exo_eps": Case(exo, np_exo, {"beta": 0.2, "epsilon": 0.1}),
    "nca": Case(nca, np_nca, {}),
    "bco": Case(bco, np_bco, {}),
    "bco_delta": Case(bco, np_bco, {"delta": 0.7}),
    "sppo_hard": Case(sppo_hard, np_sppo_hard, {}),
    "apo_zero": Case(apo_zero, np_apo_zero, {}),
    "apo_down": Case(apo_down, np_apo_down, {}),
    "dpop": Case(dpop, np_dpop, {}),
    "dpop_small_lambda": Case(dpop, np_dpop, {"beta": 0.2, "lambda_": 2.0}),
    "modpo": Case(modpo, np_modpo, {}, n_args=6),
    "modpo_w03": Case(modpo, np_modpo, {"beta": 0.5, "weight": 0.3}, n_args=6),
}
NAMES = sorted(CASES)


def random_inputs(seed: int = 0) -> list[np.ndarray]:
    """Six float64 arrays [N]: moderate and large (|x| ≤ 1e4) values, ties and extremes."""
    rng = np.random.default_rng(seed)
    moderate = -rng.uniform(0.0, 40.0, size=(6, 16))
    large = -rng.uniform(0.0, 1e4, size=(6, 16))
    ties = np.repeat(-rng.uniform(0.0, 1e4, size=(1, 8)), 6, axis=0)  # h = 0
    corners = np.array(list(np.ndindex(2, 2, 2, 2)), dtype=np.float64).T * -1e4  # [4, 16]
    corners = np.concatenate([corners, corners[:2]], axis=0)
    return list(np.concatenate([moderate, large, ties, corners], axis=1))


@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_formula_in_float64(name):
    case = CASES[name]
    args = random_inputs()[: case.n_args]
    expected = case.np_fn()(*args)
    with jax.enable_x64(True):
        got = np.asarray(case.jax_fn()(*[jnp.asarray(a) for a in args]))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_formula_in_float32_at_moderate_values(name):
    case = CASES[name]
    args = [a[:16] for a in random_inputs(1)[: case.n_args]]
    expected = case.np_fn()(*args)
    got = np.asarray(case.jax_fn()(*[jnp.asarray(a, jnp.float32) for a in args]))
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_finite_differences(name):
    case = CASES[name]
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        args = [jnp.asarray(-rng.uniform(1.0, 12.0, size=5)) for _ in range(case.n_args)]
        check_grads(case.jax_fn(), args, order=1, modes=("rev",), eps=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_no_nan_or_inf_in_values_and_gradients_at_extremes(name):
    case = CASES[name]
    args = [jnp.asarray(a, jnp.float32) for a in random_inputs(3)[: case.n_args]]
    fn = case.jax_fn()
    values = fn(*args)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(case.n_args)))(*args)
    assert values.shape == args[0].shape
    assert np.all(np.isfinite(values))
    for g in grads:
        assert np.all(np.isfinite(g))


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_eager(name):
    case = CASES[name]
    args = [jnp.asarray(a, jnp.float32) for a in random_inputs(4)[: case.n_args]]
    fn = case.jax_fn()
    np.testing.assert_allclose(jax.jit(fn)(*args), fn(*args), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_extra_leading_axis_equals_loop(name):
    case = CASES[name]
    args = [jnp.asarray(a[:48].reshape(3, 16), jnp.float32) for a in random_inputs(5)]
    args = args[: case.n_args]
    fn = case.jax_fn()
    looped = jnp.stack([fn(*[a[i] for a in args]) for i in range(3)])
    np.testing.assert_allclose(jax.vmap(fn)(*args), looped, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fn(*args), looped, rtol=1e-6, atol=1e-6)  # any leading shape


# --- closed-form anchors and identities ----------------------------------------------------


def _pair_with_margin(h: float, r_l: float = -0.5) -> tuple[jax.Array, ...]:
    """Log-probs with r_l given and r_w − r_l = h (float32 scalars)."""
    rc, rr = -20.0, -15.0
    return tuple(jnp.float32(v) for v in (rc + r_l + h, rr + r_l, rc, rr))


@pytest.mark.parametrize(
    "fn, kwargs, h, expected",
    [
        (dpo, {}, 0.0, LOG2),
        (dpo, {"label_smoothing": 0.3}, 0.0, LOG2),
        (robust_dpo, {"epsilon": 0.2}, 0.0, LOG2),
        (hinge, {}, 0.0, 1.0),
        (hinge, {"beta": 0.5}, 2.0, 0.0),
        (ipo, {}, 5.0, 0.0),  # h = 1/(2β)
        (ipo, {"beta": 0.25}, 0.0, 4.0),
        (exo, {"epsilon": 0.5}, 0.0, 0.0),
        (exo, {"epsilon": 0.01}, 0.0, -LOG2 - 0.5 * np.log(0.01 * 0.99)),
        (dpop, {}, 0.0, LOG2),  # r_w = 0: no penalty
    ],
)
def test_closed_form_anchor(fn, kwargs, h, expected):
    args = _pair_with_margin(h, r_l=-h) if fn is dpop else _pair_with_margin(h)
    np.testing.assert_allclose(float(fn(*args, **kwargs)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "fn, expected", [(nca, 2 * LOG2), (bco, 2 * LOG2), (apo_zero, 1.0), (apo_down, 1.0)]
)
def test_closed_form_anchor_at_zero_log_ratios(fn, expected):
    np.testing.assert_allclose(float(fn(-3.0, -7.0, -3.0, -7.0)), expected, rtol=1e-6)


def test_sppo_hard_is_zero_at_its_targets():
    beta = 0.001  # targets ±500
    assert float(sppo_hard(-100.0 + 500.0, -100.0 - 500.0, -100.0, -100.0, beta=beta)) == 0.0


def test_label_smoothing_zero_equals_plain_dpo():
    args = [jnp.asarray(a, jnp.float32) for a in random_inputs(6)[:4]]
    np.testing.assert_array_equal(dpo(*args, label_smoothing=0.0), dpo(*args))


def test_label_smoothing_swaps_roles_of_chosen_and_rejected():
    pc, pr, rc, rr = [jnp.asarray(a[:32], jnp.float32) for a in random_inputs(7)[:4]]
    np.testing.assert_allclose(
        dpo(pc, pr, rc, rr, label_smoothing=0.2),
        dpo(pr, pc, rr, rc, label_smoothing=0.8),
        rtol=1e-5,
    )


def test_robust_dpo_reduces_to_dpo_at_epsilon_zero():
    args = [jnp.asarray(a, jnp.float32) for a in random_inputs(8)[:4]]
    np.testing.assert_allclose(robust_dpo(*args, epsilon=0.0), dpo(*args), rtol=1e-6)


def test_robust_dpo_can_be_negative():
    # A confidently "correct" pair is rewarded below zero for the assumed flip noise.
    assert float(robust_dpo(0.0, -100.0, -10.0, -10.0, beta=1.0, epsilon=0.4)) < 0.0


@pytest.mark.parametrize("epsilon", [0.5, 0.7, -0.1])
def test_robust_dpo_rejects_epsilon_outside_half_open_unit_half(epsilon):
    with pytest.raises(ValueError, match="robust_dpo: epsilon"):
        robust_dpo(-1.0, -2.0, -1.0, -1.0, epsilon=epsilon)


@pytest.mark.parametrize(
    "fn, kwargs, field",
    [
        (dpo, {"label_smoothing": 1.5}, "label_smoothing"),
        (exo, {"epsilon": 0.0}, "epsilon"),
        (modpo, {"weight": 0.0}, "weight"),
    ],
)
def test_out_of_range_hyperparameter_names_the_field(fn, kwargs, field):
    args = (-1.0, -2.0, -1.0, -1.0) + ((0.0, 0.0) if fn is modpo else ())
    with pytest.raises(ValueError, match=field):
        fn(*args, **kwargs)


def test_dpop_equals_dpo_when_chosen_likelihood_did_not_drop():
    pc, pr, rc, rr = (jnp.array([-5.0, -9.0]), jnp.array([-7.0, -2.0]),
                      jnp.array([-6.0, -9.0]), jnp.array([-6.0, -3.0]))  # fmt: skip
    np.testing.assert_allclose(dpop(pc, pr, rc, rr), dpo(pc, pr, rc, rr), rtol=1e-6)


def test_dpop_penalises_a_drop_in_chosen_likelihood():
    # Same h = 2 in both; in the second the chosen log-prob fell by 1 below the reference.
    kept = dpop(-10.0, -12.0, -11.0, -11.0)
    dropped = dpop(-12.0, -14.0, -11.0, -11.0)
    assert float(dropped) > float(kept) + 1.0


def test_modpo_with_weight_one_equals_dpo_and_ignores_margins():
    pc, pr, rc, rr = [jnp.asarray(a[:32], jnp.float32) for a in random_inputs(9)[:4]]
    margins = jnp.linspace(-3.0, 3.0, 32)
    np.testing.assert_allclose(
        modpo(pc, pr, rc, rr, margins, -margins), dpo(pc, pr, rc, rr), rtol=1e-6
    )


def test_bco_accepts_array_delta_without_gradient_through_it():
    pc, pr, rc, rr = (jnp.array([-5.0, -9.0]), jnp.array([-7.0, -2.0]),
                      jnp.array([-6.0, -9.0]), jnp.array([-6.0, -3.0]))  # fmt: skip
    delta = jnp.array([0.2, -0.4])
    np_args = [np.asarray(a, np.float64) for a in (pc, pr, rc, rr)]
    expected = np_bco(*np_args, delta=np.asarray(delta))
    np.testing.assert_allclose(bco(pc, pr, rc, rr, delta=delta), expected, rtol=1e-6)
    grad = jax.grad(lambda d: jnp.sum(bco(pc, pr, rc, rr, delta=d)))(delta)
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("name", ["dpo", "robust_dpo", "hinge", "exo", "nca", "dpop", "ipo"])
def test_gradient_raises_chosen_and_lowers_rejected(name):
    fn = CASES[name].jax_fn()
    grads = jax.grad(lambda pc, pr: fn(pc, pr, -10.0, -10.0), argnums=(0, 1))(-10.5, -10.0)
    assert float(grads[0]) < 0.0 < float(grads[1])  # descent raises ℓ_w, lowers ℓ_l
