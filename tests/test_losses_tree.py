"""TPO (tree preference optimization) against an independent numpy loop over pairs and steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxpo.losses import _listwise, _tree

tpo = jax.jit(_tree.tpo, static_argnames="beta")  # eager op-by-op dispatch is slow on CPU
LAMBDA_2 = 1.0 - 1.0 / np.log2(3.0)  # LiPO-λ weight of a 2-list with labels [1, 0]


def np_softplus(x):
    return np.logaddexp(0.0, x)


def np_tpo(pol, ref, psi, step_mask, valid, sim, beta):
    """One tree: pol/ref [K, M], psi/valid [K], step_mask [K, M], sim [K, K, M] or None."""
    k_, m_ = pol.shape
    real = step_mask & valid[:, None]
    rho = np.where(real, np.float32(beta) * (np.float32(pol) - np.float32(ref)), 0.0)
    rho = rho.astype(np.float64)
    r = rho.sum(-1)
    idx = [i for i in range(k_) if valid[i]]
    order = sorted(idx, key=lambda i: (-np.float32(r[i]), i))
    tau = {i: n + 1 for n, i in enumerate(order)}
    total = 0.0
    for i in idx:
        for j in idx:
            if psi[i] <= psi[j]:
                continue
            lam = abs(2.0 ** psi[i] - 2.0 ** psi[j]) * abs(
                1 / np.log2(1 + tau[i]) - 1 / np.log2(1 + tau[j]))
            d = 0.0
            for m in range(m_):
                s = sim[i, j, m] if sim is not None and real[i, m] and real[j, m] else 0.0
                d += (1.0 - s) * (rho[i, m] - rho[j, m])
            total += lam * np_softplus(-d)
    return total


def random_trees(seed, batch=3, k=4, m=3, scale=10.0):
    rng = np.random.default_rng(seed)
    pol = (-rng.uniform(0, scale, (batch, k, m))).astype(np.float32)
    ref = (-rng.uniform(0, scale, (batch, k, m))).astype(np.float32)
    psi = rng.integers(0, 3, (batch, k)).astype(np.float32)
    step_mask = rng.uniform(size=(batch, k, m)) > 0.25
    valid = rng.uniform(size=(batch, k)) > 0.2
    sim = rng.uniform(size=(batch, k, k, m)).astype(np.float32)
    return pol, ref, psi, step_mask, valid, sim


@pytest.mark.parametrize("scale", [10.0, 1e4])
@pytest.mark.parametrize("with_similarity", [False, True])
def test_matches_numpy(scale, with_similarity):
    pol, ref, psi, steps, valid, sim = random_trees(0, scale=scale)
    sim = sim if with_similarity else None
    got = tpo(pol, ref, psi, step_where=steps, where=valid, step_similarity=sim, beta=0.1)
    want = [np_tpo(pol[b], ref[b], psi[b], steps[b], valid[b],
                   None if sim is None else sim[b], 0.1) for b in range(3)]
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-3 if scale > 100 else 1e-6)


def test_shared_prefix_step_contributes_nothing():
    # Three responses share step 0 (the same tree node: equal log-probs, S = 1).
    rng = np.random.default_rng(1)
    pol = rng.normal(-5, 2, (3, 3)).astype(np.float32)
    ref = rng.normal(-5, 2, (3, 3)).astype(np.float32)
    pol[:, 0], ref[:, 0] = -4.0, -6.0
    psi = np.array([2.0, 0.0, 1.0], np.float32)
    sim = np.zeros((3, 3, 3), np.float32)
    sim[:, :, 0] = 1.0
    base = tpo(pol, ref, psi, step_similarity=sim)
    moved = pol.copy()
    moved[:, 0] = -1.0  # the shared step's reward changes, identically for every response
    np.testing.assert_allclose(tpo(moved, ref, psi, step_similarity=sim), base, rtol=1e-6)
    np.testing.assert_allclose(tpo(pol, ref, psi), base, rtol=1e-6)  # ρ cancel anyway
    without = tpo(pol[:, 1:], ref[:, 1:], psi, step_similarity=sim[..., 1:])
    np.testing.assert_allclose(without, base, rtol=1e-6)  # as if the step were absent


def test_similar_steps_shrink_their_part_of_the_margin():
    pol = np.array([[-1.0, -2.0], [-3.0, -2.5]], np.float32)
    ref = np.full((2, 2), -2.0, np.float32)
    sim = np.zeros((2, 2, 2), np.float32)
    sim[:, :, 0] = 0.5
    got = tpo(pol, ref, np.array([1.0, 0.0]), step_similarity=sim, beta=1.0)
    d = 0.5 * (1.0 - (-1.0)) + (0.0 - (-0.5))  # step 0 halved, step 1 in full
    np.testing.assert_allclose(got, LAMBDA_2 * np_softplus(-d), rtol=1e-6)


def test_two_responses_without_similarity_are_lambda_times_dpo():
    pol, ref, *_ = random_trees(2, batch=5, k=2, m=3, scale=30.0)
    got = tpo(pol, ref, np.array([1.0, 0.0]), beta=0.1)
    h = (pol[:, 0].sum(-1) - ref[:, 0].sum(-1)) - (pol[:, 1].sum(-1) - ref[:, 1].sum(-1))
    np.testing.assert_allclose(got, LAMBDA_2 * np_softplus(-0.1 * h), rtol=1e-4)


def test_one_step_equals_lipo_lambda():
    pol, ref, psi, _, valid, _ = random_trees(3, m=1)
    got = tpo(pol, ref, psi, where=valid, beta=0.05)
    want = jax.jit(_listwise.lipo_lambda)(pol[..., 0], ref[..., 0], psi, where=valid)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_masked_steps_and_responses_change_nothing():
    pol, ref, psi, steps, valid, sim = random_trees(4)
    base = tpo(pol, ref, psi, step_where=steps, where=valid, step_similarity=sim)
    junk = lambda x, m: np.where(m, x, np.nan).astype(np.float32)
    real = steps & valid[..., None]
    got = tpo(junk(pol, real), junk(ref, real), junk(psi, valid), step_where=steps, where=valid,
              step_similarity=sim)
    np.testing.assert_allclose(got, base, rtol=1e-6)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(_tree.tpo(
        p, junk(ref, real), psi, step_where=steps, where=valid, step_similarity=sim))))(
        junk(pol, real))
    assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads)[~real] == 0)


def test_all_masked_and_single_response_give_zero():
    pol, ref, psi, *_ = random_trees(5)
    fn = jax.jit(jax.value_and_grad(lambda p: jnp.sum(_tree.tpo(
        p, ref, psi, where=jnp.zeros(psi.shape, bool)))))
    loss, grads = fn(pol)
    assert float(loss) == 0.0 and np.all(np.asarray(grads) == 0)
    np.testing.assert_array_equal(tpo(pol[:, :1], ref[:, :1], psi[:, :1]), np.zeros(3))


def test_no_nan_for_huge_inputs_and_ties():
    pol = np.array([[[-1e4, 1e4], [-1e4, 1e4], [0.0, 0.0]]], np.float32)
    ref = np.array([[[1e4, -1e4], [1e4, -1e4], [0.0, 0.0]]], np.float32)
    psi = np.array([[1.0, 1.0, 0.0]], np.float32)
    sim = np.ones((1, 3, 3, 2), np.float32)
    fn = jax.jit(jax.value_and_grad(lambda p: jnp.sum(_tree.tpo(p, ref, psi, step_similarity=sim))))
    loss, grads = fn(pol)
    assert np.isfinite(loss) and np.all(np.isfinite(grads))


def test_jit_equals_eager_and_vmap_equals_loop():
    pol, ref, psi, steps, valid, sim = random_trees(6, batch=2)
    kw = lambda b: {"step_where": steps[b], "where": valid[b], "step_similarity": sim[b]}
    eager = _tree.tpo(pol, ref, psi, step_where=steps, where=valid, step_similarity=sim)
    np.testing.assert_allclose(tpo(pol, ref, psi, step_where=steps, where=valid,
                                   step_similarity=sim), eager, rtol=1e-6)
    mapped = jax.jit(jax.vmap(lambda p, r, y, s, v, m: _tree.tpo(
        p, r, y, step_where=s, where=v, step_similarity=m)))(pol, ref, psi, steps, valid, sim)
    looped = [tpo(pol[b], ref[b], psi[b], **kw(b)) for b in range(2)]
    np.testing.assert_allclose(mapped, looped, rtol=1e-6)


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(7)
    _, _, psi, steps, valid, sim = random_trees(7, batch=2)
    with jax.enable_x64(True):
        pol = jnp.asarray(rng.normal(0, 3, (2, 4, 3)))
        ref = jnp.asarray(rng.normal(0, 3, (2, 4, 3)))
        fn = jax.jit(lambda p, r: _tree.tpo(p, r, psi, step_where=steps, where=valid,
                                            step_similarity=sim))
        check_grads(fn, (pol, ref), order=1, modes=["rev"])
