"""Reference-free (SimPO, ORPO, CPO, TPO), unpaired (KTO) and auxiliary (SFT) losses.

Each is checked against an independent float64 numpy/scipy computation of its LOSSES.md
formula, for gradients, jit, vmap and finiteness at extreme inputs.
"""

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

from jaxpo.losses._auxiliary import sft
from jaxpo.losses._numerics import log1mexp
from jaxpo.losses._pairwise import dpo
from jaxpo.losses._reference_free import cpo, orpo, simpo, triple_po
from jaxpo.losses._unpaired import kto

LOG2 = np.log(2.0)
ORPO_CLAMP = -1e-6  # documented in orpo's docstring


# --- independent numpy references (float64) ------------------------------------------------


def np_log1mexp(x):
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    near = x > -LOG2
    out[near] = np.log(-np.expm1(x[near]))
    out[~near] = np.log1p(-np.exp(x[~near]))
    return out


def np_simpo(w, l, beta=2.0, gamma=0.5):
    return -log_expit(beta * (w - l) - gamma)


def np_orpo(w, l, nll, alpha=0.1):
    log_odds_w = w - np_log1mexp(np.minimum(w, ORPO_CLAMP))
    log_odds_l = l - np_log1mexp(np.minimum(l, ORPO_CLAMP))
    return nll - alpha * log_expit(log_odds_w - log_odds_l)


def np_cpo(w, l, nll, beta=0.1, alpha=1.0):
    return -log_expit(beta * (w - l)) + alpha * nll


def np_triple_po(w, l, nll, beta=0.01, alpha=1.0):
    return -log_expit(beta * (w - l)) + alpha * nll


def np_kto(pol, ref, desirable, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    r = pol - ref
    z0 = np.maximum(kl, 0.0)
    return np.where(
        desirable,
        desirable_weight * (1 - expit(beta * (r - z0))),
        undesirable_weight * (1 - expit(beta * (z0 - r))),
    )


def np_sft(logps, n):
    return -logps / np.maximum(n, 1)


@dataclasses.dataclass(frozen=True)
class Case:
    fn: Callable
    ref: Callable
    kwargs: dict
    mean_logps: bool  # inputs are per-token means (in (−inf, 0])
    n_args: int = 3  # (chosen, rejected[, nll])

    def jax_fn(self) -> Callable:
        return functools.partial(self.fn, **self.kwargs)

    def np_fn(self) -> Callable:
        return functools.partial(self.ref, **self.kwargs)


CASES = {
    "simpo": Case(simpo, np_simpo, {}, True, n_args=2),
    "simpo_custom": Case(simpo, np_simpo, {"beta": 2.5, "gamma": 1.4}, True, n_args=2),
    "orpo": Case(orpo, np_orpo, {}, True),
    "orpo_alpha": Case(orpo, np_orpo, {"alpha": 1.0}, True),
    "cpo": Case(cpo, np_cpo, {}, False),
    "cpo_custom": Case(cpo, np_cpo, {"beta": 0.5, "alpha": 0.2}, False),
    "triple_po": Case(triple_po, np_triple_po, {}, False),
    "triple_po_custom": Case(triple_po, np_triple_po, {"beta": 0.3, "alpha": 2.0}, False),
}
NAMES = sorted(CASES)


def random_inputs(mean_logps: bool, seed: int = 0) -> list[np.ndarray]:
    """(chosen, rejected, nll) float64 [N] with moderate, large, tied, zero and extreme values."""
    rng = np.random.default_rng(seed)
    scale = 20.0 if mean_logps else 1e4
    moderate = -rng.uniform(0.0, 3.0, size=(2, 16))
    large = -rng.uniform(0.0, scale, size=(2, 16))
    tiny = -rng.uniform(0.0, 1e-5, size=(2, 8))  # mean log-probs near and below the clamp
    ties = np.repeat(-rng.uniform(0.0, scale, size=(1, 8)), 2, axis=0)
    corners = np.array([[0.0, 0.0, -1e4, -1e4], [0.0, -1e4, 0.0, -1e4]])
    logps = np.concatenate([moderate, large, tiny, ties, corners], axis=1)
    nll = rng.uniform(0.0, 10.0, size=logps.shape[1])
    return [logps[0], logps[1], nll]


@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_formula_in_float64(name):
    case = CASES[name]
    args = random_inputs(case.mean_logps)[: case.n_args]
    expected = case.np_fn()(*args)
    with jax.enable_x64(True):
        got = np.asarray(case.jax_fn()(*[jnp.asarray(a) for a in args]))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_finite_differences(name):
    case = CASES[name]
    rng = np.random.default_rng(1)
    high = 3.0 if case.mean_logps else 30.0
    with jax.enable_x64(True):
        args = [jnp.asarray(-rng.uniform(0.1, high, size=5)) for _ in range(2)]
        args.append(jnp.asarray(rng.uniform(0.0, 5.0, size=5)))
        check_grads(case.jax_fn(), args[: case.n_args], order=1, modes=("rev",), eps=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_no_nan_or_inf_in_values_and_gradients_at_extremes(name):
    case = CASES[name]
    args = [jnp.asarray(a, jnp.float32) for a in random_inputs(case.mean_logps, seed=2)]
    args[0] = args[0].at[:3].set(jnp.array([0.0, 1e-8, 3.0]))  # p = 1 and invalid positive
    args = args[: case.n_args]
    fn = case.jax_fn()
    values = fn(*args)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(case.n_args)))(*args)
    assert np.all(np.isfinite(values))
    for g in grads:
        assert np.all(np.isfinite(g))


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_vmap_equal_eager_loop(name):
    case = CASES[name]
    args = [jnp.asarray(a[:48].reshape(3, 16), jnp.float32)
            for a in random_inputs(case.mean_logps, seed=3)][: case.n_args]  # fmt: skip
    fn = case.jax_fn()
    looped = jnp.stack([fn(*[a[i] for a in args]) for i in range(3)])
    np.testing.assert_allclose(jax.jit(fn)(*args), fn(*args), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(fn)(*args), looped, rtol=1e-6, atol=1e-6)


def test_simpo_is_log_two_when_margin_meets_target():
    np.testing.assert_allclose(float(simpo(-1.0, -1.25, beta=2.0, gamma=0.5)), LOG2, rtol=1e-6)


def test_cpo_and_triple_po_at_a_tie_are_log_two_plus_weighted_nll():
    np.testing.assert_allclose(float(cpo(-7.0, -7.0, 2.0, alpha=0.5)), LOG2 + 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(triple_po(-7.0, -7.0, 2.0, alpha=3.0)), LOG2 + 6.0, rtol=1e-6)


def test_cpo_preference_term_is_reference_free_dpo():
    w, l = jnp.array([-3.0, -40.0]), jnp.array([-5.0, -20.0])
    np.testing.assert_allclose(cpo(w, l, 0.0, beta=0.3), dpo(w, l, 0.0, 0.0, beta=0.3), rtol=1e-6)


def test_orpo_odds_ratio_term_is_log_two_at_equal_odds():
    np.testing.assert_allclose(float(orpo(-0.7, -0.7, 0.0, alpha=1.0)), LOG2, rtol=1e-6)


def test_orpo_is_finite_with_gradient_when_a_mean_log_prob_is_zero():
    loss, grads = jax.value_and_grad(lambda w, l: orpo(w, l, 1.0), argnums=(0, 1))(0.0, -0.5)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(g)) for g in grads)
    assert float(loss) < 1.0 + 0.1 * LOG2  # the chosen's odds exceed the rejected's


# --- log1mexp ---------------------------------------------------------------------------------


def test_log1mexp_matches_numpy_across_the_range_with_finite_gradients():
    x = -np.concatenate([np.logspace(-12, 4, 40), [LOG2 - 1e-9, LOG2, LOG2 + 1e-9]])
    with jax.enable_x64(True):
        got = np.asarray(log1mexp(jnp.asarray(x)))
        grads = np.asarray(jax.vmap(jax.grad(log1mexp))(jnp.asarray(x)))
    np.testing.assert_allclose(got, np_log1mexp(x), rtol=1e-12)
    np.testing.assert_allclose(grads, -np.exp(x) / -np.expm1(x), rtol=1e-9)  # d/dx = −eˣ/(1−eˣ)


# --- kto ---------------------------------------------------------------------------------------


def kto_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    pol = np.concatenate([-rng.uniform(0, 40, 16), -rng.uniform(0, 1e4, 16), [0.0, -1e4, -5.0]])
    ref = np.concatenate([-rng.uniform(0, 40, 16), -rng.uniform(0, 1e4, 16), [-1e4, 0.0, -5.0]])
    desirable = rng.uniform(size=pol.shape) < 0.5
    return pol, ref, desirable


@pytest.mark.parametrize(
    "kwargs", [{}, {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.7}]
)
@pytest.mark.parametrize("kl", [0.0, 3.5, -2.0, "array"])
def test_kto_matches_numpy_formula_in_float64(kwargs, kl):
    pol, ref, desirable = kto_inputs()
    if kl == "array":
        kl = np.random.default_rng(1).uniform(-1.0, 5.0, size=pol.shape)
    expected = np_kto(pol, ref, desirable, kl, **kwargs)
    with jax.enable_x64(True):
        got = kto(jnp.asarray(pol), jnp.asarray(ref), desirable, jnp.asarray(kl), **kwargs)
        got = np.asarray(got)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_kto_gradients_are_checked_and_kl_gets_none():
    rng = np.random.default_rng(4)
    desirable = np.array([True, False, True, False])
    with jax.enable_x64(True):
        pol, ref = (jnp.asarray(-rng.uniform(1, 30, 4)) for _ in range(2))
        fn = functools.partial(kto, desirable=desirable, kl=jnp.asarray(0.7), beta=0.3)
        check_grads(lambda p, r: fn(p, r), (pol, ref), order=1, modes=("rev",), eps=1e-6)
        g_kl = jax.grad(lambda k: jnp.sum(kto(pol, ref, desirable, k)))(jnp.asarray(0.7))
    assert float(g_kl) == 0.0


def test_kto_is_finite_under_jit_and_vmap_at_extremes():
    pol, ref, desirable = (jnp.asarray(a) for a in kto_inputs(5))
    pol, ref = pol.astype(jnp.float32), ref.astype(jnp.float32)
    fn = functools.partial(kto, beta=0.1)
    values = jax.jit(fn)(pol, ref, desirable, 1.0)
    grads = jax.grad(lambda p, r: jnp.sum(fn(p, r, desirable, 1.0)), argnums=(0, 1))(pol, ref)
    assert np.all(np.isfinite(values)) and all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_allclose(values, fn(pol, ref, desirable, 1.0), rtol=1e-6)
    batched = [a[:33].reshape(3, 11) for a in (pol, ref, desirable)]
    looped = jnp.stack([fn(*[a[i] for a in batched], 1.0) for i in range(3)])
    np.testing.assert_allclose(jax.vmap(fn, (0, 0, 0, None))(*batched, 1.0), looped, rtol=1e-6)


def test_kto_at_reference_point_is_half_the_weight():
    loss = kto(jnp.array([-3.0, -3.0]), jnp.array([-5.0, -5.0]), jnp.array([True, False]), 2.0,
               desirable_weight=2.0, undesirable_weight=0.5)  # fmt: skip
    np.testing.assert_allclose(loss, [1.0, 0.25], rtol=1e-6)


# --- sft -----------------------------------------------------------------------------------------


def test_sft_is_token_mean_nll_and_zero_for_empty_responses():
    logps = np.array([-6.0, -1e4, 0.0, -3.0])
    n = np.array([3, 5000, 0, 0])
    np.testing.assert_allclose(sft(jnp.asarray(logps, jnp.float32), n), np_sft(logps, n), rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(sft(x, n)))(jnp.asarray(logps, jnp.float32))
    np.testing.assert_allclose(grad, -1.0 / np.maximum(n, 1), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(sft)(logps, n), sft(logps, n), rtol=1e-6)
