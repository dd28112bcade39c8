"""Token-level losses (TDPO, SparsePO) and masked reductions against per-example numpy loops."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.special import log_expit

from jaxpo.losses._numerics import masked_mean, masked_sum
from jaxpo.losses._pairwise import dpo
from jaxpo.losses._token import sparse_po, tdpo

N, TW, TL = 24, 7, 5  # examples, chosen tokens, rejected tokens


# --- independent numpy references: python loops over examples, boolean indexing -------------


def np_tdpo(pc, pr, rc, rr, klc, klr, mc, mr, beta=0.1, alpha=0.5, variant=2):
    out = []
    for i in range(len(pc)):
        w, l = mc[i], mr[i]
        h = (pc[i][w].sum() - rc[i][w].sum()) - (pr[i][l].sum() - rr[i][l].sum())
        kl_gap = klr[i][l].sum() - klc[i][w].sum()
        coef = beta if variant == 1 else alpha * beta
        out.append(-log_expit(beta * h - coef * kl_gap))
    return np.array(out)


def np_sparse_po(pc, pr, rc, rr, klc, klr, wc, wr, mc, mr, beta=0.1, mask_l1=0.001):
    out = []
    for i in range(len(pc)):
        w, l = mc[i], mr[i]
        u = np.dot(wc[i][w], pc[i][w] - rc[i][w]) - np.dot(wr[i][l], pr[i][l] - rr[i][l])
        d = np.dot(wr[i][l], klr[i][l]) - np.dot(wc[i][w], klc[i][w])
        l1 = np.abs(wc[i][w]).sum() + np.abs(wr[i][l]).sum()
        out.append(-log_expit(beta * (u - d)) + mask_l1 * l1)
    return np.array(out)


def random_masks(rng, n, t):
    """Contiguous prefixes of every length 0..t (all-masked included), then random masks."""
    lengths = np.arange(n) % (t + 1)
    prefix = np.arange(t)[None, :] < lengths[:, None]
    scattered = rng.uniform(size=(n, t)) < 0.5
    return np.where((np.arange(n) % 2 == 0)[:, None], prefix, scattered)


def token_inputs(seed=0, scale=20.0, garbage=None):
    """(arrays dict, chosen_mask, rejected_mask); masked positions hold `garbage` if given."""
    rng = np.random.default_rng(seed)
    mc, mr = random_masks(rng, N, TW), random_masks(rng, N, TL)
    arrays = {}
    for side, t, m in (("chosen", TW, mc), ("rejected", TL, mr)):
        logps = -rng.uniform(0.0, scale, size=(2, N, t))
        logps[:, :4] *= 1e4 / scale  # a few examples with |log-probs| up to 1e4
        arrays[f"policy_{side}"] = logps[0]
        arrays[f"reference_{side}"] = logps[1]
        arrays[f"kl_{side}"] = rng.uniform(0.0, 5.0, size=(N, t))
        arrays[f"weights_{side}"] = rng.uniform(-1.0, 1.0, size=(N, t))
        if garbage is not None:
            for k in list(arrays):
                if k.endswith(side):
                    arrays[k] = np.where(m, arrays[k], garbage)
    return arrays, mc, mr


def sequence_args(a):
    return [a["policy_chosen"], a["policy_rejected"], a["reference_chosen"],
            a["reference_rejected"]]  # fmt: skip


def tdpo_args(a):
    return [a["policy_chosen"], a["policy_rejected"], a["reference_chosen"],
            a["reference_rejected"], a["kl_chosen"], a["kl_rejected"]]  # fmt: skip


def sparse_args(a):
    return tdpo_args(a) + [a["weights_chosen"], a["weights_rejected"]]


CASES = {
    "tdpo2": (tdpo, np_tdpo, tdpo_args, {}),
    "tdpo2_custom": (tdpo, np_tdpo, tdpo_args, {"beta": 0.5, "alpha": 0.3}),
    "tdpo1": (tdpo, np_tdpo, tdpo_args, {"variant": 1}),
    "tdpo1_custom": (tdpo, np_tdpo, tdpo_args, {"variant": 1, "beta": 0.05}),
    "sparse_po": (sparse_po, np_sparse_po, sparse_args, {}),
    "sparse_po_custom": (sparse_po, np_sparse_po, sparse_args, {"beta": 0.4, "mask_l1": 0.05}),
}
NAMES = sorted(CASES)


def jax_call(name, args, mc, mr):
    fn, _, _, kwargs = CASES[name]
    return fn(*args, chosen_mask=mc, rejected_mask=mr, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_loop_in_float64(name):
    _, ref, pick, kwargs = CASES[name]
    arrays, mc, mr = token_inputs(garbage=123.0)
    expected = ref(*pick(arrays), mc, mr, **kwargs)
    with jax.enable_x64(True):
        got = np.asarray(jax_call(name, [jnp.asarray(x) for x in pick(arrays)], mc, mr))
    assert got.shape == (N,) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_finite_differences(name):
    fn, _, pick, kwargs = CASES[name]
    arrays, mc, mr = token_inputs(seed=1, scale=3.0)
    args = [x[4:10] for x in pick(arrays)]  # moderate values only
    # TDPO2 stops the gradient of SeqKL_w on purpose: hold chosen_token_kl fixed there.
    held = 4 if fn is tdpo and kwargs.get("variant", 2) == 2 else None
    with jax.enable_x64(True):
        args = [jnp.asarray(x) for x in args]

        def loss(*free):
            full = list(free[:held]) + [args[held]] + list(free[held:]) if held else free
            return jax_call(name, full, mc[4:10], mr[4:10])

        free = args[:held] + args[held + 1 :] if held else args
        check_grads(loss, free, order=1, modes=("rev",), eps=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("garbage", [np.inf, np.nan, -1e30])
def test_masked_tokens_change_neither_value_nor_gradient(name, garbage):
    _, _, pick, _ = CASES[name]
    clean, mc, mr = token_inputs(seed=2, garbage=0.0)
    dirty, _, _ = token_inputs(seed=2, garbage=garbage)
    loss_sum = lambda *a: jnp.sum(jax_call(name, a, mc, mr))
    argnums = tuple(range(len(pick(clean))))
    values, grads = [], []
    for arrays in (clean, dirty):
        args = [jnp.asarray(x, jnp.float32) for x in pick(arrays)]
        values.append(jax_call(name, args, mc, mr))
        grads.append(jax.grad(loss_sum, argnums=argnums)(*args))
    np.testing.assert_array_equal(values[1], values[0])
    for g_dirty, g_clean, mask in zip(grads[1], grads[0], [mc, mr] * 4):
        np.testing.assert_array_equal(g_dirty, g_clean)
        np.testing.assert_array_equal(np.asarray(g_dirty)[~mask], 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_pairs_give_log_two_with_finite_gradients(name):
    _, _, pick, _ = CASES[name]
    arrays, _, _ = token_inputs(seed=3)
    mc, mr = np.zeros((N, TW), bool), np.zeros((N, TL), bool)
    args = [jnp.asarray(x, jnp.float32) for x in pick(arrays)]
    values = jax_call(name, args, mc, mr)
    grads = jax.grad(lambda *a: jnp.sum(jax_call(name, a, mc, mr)), argnums=(0, 1, 4))(*args)
    np.testing.assert_allclose(values, np.log(2.0), rtol=1e-6)
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_and_finiteness_at_extremes(name):
    fn, _, pick, kwargs = CASES[name]
    arrays, mc, mr = token_inputs(seed=4, scale=1e4)
    args = [jnp.asarray(x, jnp.float32) for x in pick(arrays)]
    call = functools.partial(fn, **kwargs)
    eager = call(*args, chosen_mask=mc, rejected_mask=mr)
    jitted = jax.jit(call)(*args, chosen_mask=mc, rejected_mask=mr)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    assert np.all(np.isfinite(eager))
    grads = jax.grad(lambda *a: jnp.sum(call(*a, chosen_mask=mc, rejected_mask=mr)),
                     argnums=tuple(range(len(args))))(*args)  # fmt: skip
    assert all(np.all(np.isfinite(g)) for g in grads)
    split = lambda x: jnp.asarray(x).reshape(3, N // 3, -1)
    b_args, b_mc, b_mr = [split(a) for a in args], split(mc), split(mr)
    mapped = jax.vmap(lambda a, m, r: call(*a, chosen_mask=m, rejected_mask=r))(b_args, b_mc, b_mr)
    looped = jnp.stack([call(*[a[i] for a in b_args], chosen_mask=b_mc[i], rejected_mask=b_mr[i])
                        for i in range(3)])  # fmt: skip
    np.testing.assert_allclose(mapped, looped, rtol=1e-6)
    np.testing.assert_allclose(mapped.reshape(-1), eager, rtol=1e-6)


def test_tdpo_variants_agree_in_value_at_alpha_one_but_tdpo2_stops_chosen_kl_gradient():
    arrays, mc, mr = token_inputs(seed=5, scale=3.0)
    args = [jnp.asarray(x, jnp.float32) for x in tdpo_args(arrays)]
    v1 = tdpo(*args, chosen_mask=mc, rejected_mask=mr, variant=1)
    v2 = tdpo(*args, chosen_mask=mc, rejected_mask=mr, variant=2, alpha=1.0)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    grad_kl = lambda v: jax.grad(
        lambda k: jnp.sum(tdpo(*args[:4], k, args[5], chosen_mask=mc, rejected_mask=mr,
                               variant=v, alpha=1.0)))(args[4])  # fmt: skip
    assert np.all(np.asarray(grad_kl(2)) == 0.0)
    assert np.any(np.asarray(grad_kl(1))[mc] != 0.0)


def test_tdpo_without_kl_is_dpo_on_masked_sums():
    arrays, mc, mr = token_inputs(seed=6, scale=3.0)
    a = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
    zeros_c, zeros_r = jnp.zeros((N, TW)), jnp.zeros((N, TL))
    got = tdpo(*sequence_args(a), zeros_c, zeros_r, chosen_mask=mc, rejected_mask=mr)
    sums = [masked_sum(x, m) for x, m in zip(sequence_args(a), (mc, mr, mc, mr))]
    np.testing.assert_allclose(got, dpo(*sums), rtol=1e-5)


def test_sparse_po_with_unit_weights_and_no_kl_is_dpo_plus_length_penalty():
    arrays, mc, mr = token_inputs(seed=7, scale=3.0)
    a = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
    zeros_c, zeros_r = jnp.zeros((N, TW)), jnp.zeros((N, TL))
    ones_c, ones_r = jnp.ones((N, TW)), jnp.ones((N, TL))
    got = sparse_po(*sequence_args(a), zeros_c, zeros_r, ones_c, ones_r,
                    chosen_mask=mc, rejected_mask=mr, mask_l1=0.01)  # fmt: skip
    sums = [masked_sum(x, m) for x, m in zip(sequence_args(a), (mc, mr, mc, mr))]
    expected = dpo(*sums) + 0.01 * (mc.sum(-1) + mr.sum(-1))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_tdpo_rejects_unknown_variant():
    x, m = jnp.zeros((2, 3)), jnp.ones((2, 3), bool)
    with pytest.raises(ValueError, match="tdpo: variant"):
        tdpo(x, x, x, x, x, x, chosen_mask=m, rejected_mask=m, variant=3)


@pytest.mark.parametrize("fn, n_args", [(tdpo, 6), (sparse_po, 8)])
def test_token_array_shape_mismatch_names_the_field(fn, n_args):
    x, m = jnp.zeros((2, 3)), jnp.ones((2, 3), bool)
    args = [x] * n_args
    args[5] = jnp.zeros((2, 4))  # rejected_token_kl
    with pytest.raises(ValueError, match="rejected_token_kl"):
        fn(*args, chosen_mask=m, rejected_mask=m)


def test_masked_mean_of_all_masked_rows_is_zero_with_finite_gradient():
    x = jnp.array([[1.0, 2.0, 4.0], [jnp.inf, jnp.nan, 5.0]])
    where = jnp.array([[True, False, True], [False, False, False]])
    np.testing.assert_allclose(masked_mean(x, where), [2.5, 0.0])
    np.testing.assert_allclose(masked_sum(x, where), [5.0, 0.0])
    grad = jax.grad(lambda v: jnp.sum(masked_mean(v, where)))(x)
    np.testing.assert_array_equal(grad, [[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]])
