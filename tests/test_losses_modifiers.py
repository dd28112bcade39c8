"""WPO weights and LD-DPO log-probs against per-example numpy loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.special import log_softmax

from jaxpo.losses._modifiers import ld_logps, wpo_weights
from jaxpo.losses._numerics import masked_sum

N, T, V = 12, 6, 11  # responses, tokens, vocabulary


def policy_tokens(seed=0):
    """Physically consistent (token_logps, log Σ_v p_v², mask) for N sampled responses [N, T]."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(N, T, V))
    logp = log_softmax(logits, axis=-1)  # [N, T, V]
    tokens = rng.integers(0, V, size=(N, T))
    token_logps = np.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]  # [N, T]
    log_sum_sq = np.log(np.sum(np.exp(2 * logp), axis=-1))  # [N, T]
    lengths = np.arange(N) % (T + 1)  # 0..T, all-masked rows included
    mask = np.arange(T)[None, :] < lengths[:, None]
    mask[1::3] = rng.uniform(size=mask[1::3].shape) < 0.6  # some non-contiguous masks
    return token_logps, log_sum_sq, mask


# --- wpo_weights ---------------------------------------------------------------------------------


def np_wpo(token_logps, log_sum_sq, mask):
    out = []
    for lp, ls, m in zip(token_logps, log_sum_sq, mask):
        out.append(np.exp(np.mean(lp[m] - ls[m])) if m.any() else 1.0)
    return np.array(out)


def test_wpo_weights_match_numpy_loop_in_float64():
    lp, ls, mask = policy_tokens()
    garbage = np.where(mask, lp, np.nan)  # masked positions must not matter
    with jax.enable_x64(True):
        got = np.asarray(wpo_weights(jnp.asarray(garbage), jnp.asarray(ls), where=mask))
    np.testing.assert_allclose(got, np_wpo(lp, ls, mask), rtol=1e-12)


def test_wpo_weight_of_zero_length_response_is_one():
    lp, ls, _ = policy_tokens()
    got = wpo_weights(lp, ls, where=np.zeros((N, T), bool))
    np.testing.assert_array_equal(got, 1.0)


def test_wpo_where_none_equals_all_real_tokens():
    lp, ls, _ = policy_tokens(1)
    np.testing.assert_allclose(
        wpo_weights(lp, ls), wpo_weights(lp, ls, where=np.ones((N, T), bool)), rtol=1e-6
    )


def test_wpo_weight_is_one_for_a_deterministic_policy_and_a_uniform_one():
    one_hot = wpo_weights(jnp.zeros((1, T)), jnp.zeros((1, T)))  # p_t = 1 = Σ p²
    uniform = wpo_weights(jnp.full((1, T), -np.log(V)), jnp.full((1, T), -np.log(V)))
    np.testing.assert_allclose([one_hot[0], uniform[0]], 1.0, rtol=1e-6)


def test_wpo_weights_carry_no_gradient():
    lp, ls, mask = (jnp.asarray(a) for a in policy_tokens(2))
    lp, ls = lp.astype(jnp.float32), ls.astype(jnp.float32)
    grads = jax.grad(lambda a, b: jnp.sum(wpo_weights(a, b, where=mask)), argnums=(0, 1))(lp, ls)
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)


def test_wpo_weights_are_finite_for_extreme_inputs_and_jit_vmap_agree():
    rng = np.random.default_rng(3)
    lp = jnp.asarray(-rng.uniform(0, 1e4, size=(N, T)), jnp.float32).at[0].set(0.0)
    ls = jnp.asarray(-rng.uniform(0, 1e4, size=(N, T)), jnp.float32)  # non-physical on purpose
    mask = jnp.asarray(policy_tokens()[2])
    eager = wpo_weights(lp, ls, where=mask)
    assert np.all(np.isfinite(eager)) and np.all(np.asarray(eager) >= 0.0)
    np.testing.assert_allclose(jax.jit(wpo_weights)(lp, ls, where=mask), eager, rtol=1e-6)
    split = lambda x: x.reshape(3, N // 3, T)
    mapped = jax.vmap(lambda a, b, m: wpo_weights(a, b, where=m))(split(lp), split(ls), split(mask))
    looped = jnp.stack([wpo_weights(split(lp)[i], split(ls)[i], where=split(mask)[i])
                        for i in range(3)])  # fmt: skip
    np.testing.assert_allclose(mapped, looped, rtol=1e-6)


# --- ld_logps ------------------------------------------------------------------------------------


def np_ld_logps(chosen, rejected, chosen_mask, rejected_mask, alpha=0.5):
    out_c, out_r = [], []
    for c, r, mc, mr in zip(chosen, rejected, chosen_mask, rejected_mask):
        shared = min(mc.sum(), mr.sum())
        for logps, mask, out in ((c, mc, out_c), (r, mr, out_r)):
            total, seen = 0.0, 0
            for lp, real in zip(logps, mask):
                if real:
                    seen += 1
                    total += lp if seen <= shared else alpha * lp
            out.append(total)
    return np.array(out_c), np.array(out_r)


def ld_inputs(seed=0, tl=4):
    rng = np.random.default_rng(seed)
    chosen = -rng.uniform(0, 10, size=(N, T))
    rejected = -rng.uniform(0, 10, size=(N, tl))
    chosen[:3] *= 1e3  # |log-probs| up to 1e4
    mc = rng.uniform(size=(N, T)) < 0.7
    mr = rng.uniform(size=(N, tl)) < 0.7
    mc[0], mr[1], mc[2], mr[2] = False, False, False, False  # empty responses
    return chosen, rejected, mc, mr


@pytest.mark.parametrize("alpha", [0.5, 0.0, 0.25, 1.0])
def test_ld_logps_match_numpy_loop_in_float64(alpha):
    chosen, rejected, mc, mr = ld_inputs()
    dirty_c, dirty_r = np.where(mc, chosen, np.inf), np.where(mr, rejected, np.nan)
    with jax.enable_x64(True):
        got = ld_logps(jnp.asarray(dirty_c), jnp.asarray(dirty_r), chosen_mask=mc,
                       rejected_mask=mr, alpha=alpha)  # fmt: skip
    expected = np_ld_logps(chosen, rejected, mc, mr, alpha=alpha)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-12, atol=1e-12)


def test_ld_logps_alpha_one_or_equal_lengths_give_plain_sums():
    chosen, rejected, mc, mr = ld_inputs(1, tl=T)
    c1, r1 = ld_logps(chosen, rejected, chosen_mask=mc, rejected_mask=mr, alpha=1.0)
    np.testing.assert_allclose(c1, masked_sum(chosen, mc), rtol=1e-6)
    np.testing.assert_allclose(r1, masked_sum(rejected, mr), rtol=1e-6)
    full = np.ones((N, T), bool)
    c, r = ld_logps(chosen, rejected, chosen_mask=full, rejected_mask=full, alpha=0.3)
    np.testing.assert_allclose(c, chosen.sum(-1), rtol=1e-6)
    np.testing.assert_allclose(r, rejected.sum(-1), rtol=1e-6)


def test_ld_logps_scale_only_the_longer_tail():
    chosen = jnp.array([[-1.0, -2.0, -3.0, -4.0]])
    rejected = jnp.array([[-5.0, -6.0, 0.0, 0.0]])
    c, r = ld_logps(chosen, rejected, chosen_mask=jnp.array([[True] * 4]),
                    rejected_mask=jnp.array([[True, True, False, False]]), alpha=0.5)  # fmt: skip
    np.testing.assert_allclose([c[0], r[0]], [-3.0 - 0.5 * 7.0, -11.0])


def test_ld_logps_gradients_are_the_token_scales():
    chosen, rejected, mc, mr = ld_inputs(2)
    with jax.enable_x64(True):
        def fn(c, r, rows=slice(None)):
            return ld_logps(c, r, chosen_mask=mc[rows], rejected_mask=mr[rows], alpha=0.3)

        moderate = slice(3, None)
        c, r = jnp.asarray(chosen[moderate]), jnp.asarray(rejected[moderate])
        check_grads(lambda c, r: fn(c, r, moderate), (c, r), order=1, modes=("rev",), eps=1e-6)
        grad_c = jax.grad(lambda c: jnp.sum(fn(c, jnp.asarray(rejected))[0]))(jnp.asarray(chosen))
    grad_c = np.asarray(grad_c)
    assert set(np.unique(grad_c[mc])) <= {0.3, 1.0} and np.all(grad_c[~mc] == 0.0)
    rank = np.cumsum(mc, axis=-1)
    shared = np.minimum(mc.sum(-1), mr.sum(-1))[:, None]
    np.testing.assert_array_equal(grad_c, np.where(mc, np.where(rank <= shared, 1.0, 0.3), 0.0))


def test_ld_logps_all_masked_give_zero_with_finite_gradients_and_jit_vmap_agree():
    chosen, rejected, mc, mr = (jnp.asarray(a) for a in ld_inputs(3))
    chosen, rejected = chosen.astype(jnp.float32), rejected.astype(jnp.float32)
    none_c, none_r = jnp.zeros_like(mc), jnp.zeros_like(mr)
    zeros = ld_logps(chosen, rejected, chosen_mask=none_c, rejected_mask=none_r)
    np.testing.assert_array_equal(np.asarray(zeros), 0.0)
    def total(c, r):
        c_out, r_out = ld_logps(c, r, chosen_mask=none_c, rejected_mask=none_r)
        return jnp.sum(c_out) + jnp.sum(r_out)

    grads = jax.grad(total, argnums=(0, 1))(chosen, rejected)
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)
    call = lambda c, r, m, n: ld_logps(c, r, chosen_mask=m, rejected_mask=n)
    eager = call(chosen, rejected, mc, mr)
    for j, e in zip(jax.jit(call)(chosen, rejected, mc, mr), eager):
        np.testing.assert_allclose(j, e, rtol=1e-6)
    split = lambda x: x.reshape(3, N // 3, -1)
    args = [split(a) for a in (chosen, rejected, mc, mr)]
    mapped = jax.vmap(call)(*args)
    for k in range(2):
        looped = jnp.stack([call(*[a[i] for a in args])[k] for i in range(3)])
        np.testing.assert_allclose(mapped[k], looped, rtol=1e-6)
        np.testing.assert_allclose(mapped[k].reshape(-1), eager[k], rtol=1e-6)


def test_ld_logps_rejects_alpha_outside_unit_interval():
    x, m = jnp.zeros((1, 3)), jnp.ones((1, 3), bool)
    with pytest.raises(ValueError, match="ld_logps: alpha"):
        ld_logps(x, x, chosen_mask=m, rejected_mask=m, alpha=1.5)
