"""Listwise losses against independent numpy loops over pairs / sorted lists."""

import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.special import log_softmax, logsumexp, softmax

from jaxpo.losses import _listwise as lw

BETA = 0.1


def J(fn):
    """jit with the hyperparameters static (eager op-by-op dispatch is slow on CPU)."""
    names = ("beta", "alpha", "sft_weight")
    return jax.jit(fn, static_argnames=[n for n in names if n in inspect.signature(fn).parameters])


def np_softplus(x):
    return np.logaddexp(0.0, x)


def np_scores(pl, rl, beta):
    """s in float32 exactly as jax computes it (so ranks agree), then float64."""
    s = np.float32(beta) * (np.float32(pl) - np.float32(rl))
    return s.astype(np.float64)


def np_dpo(pc, pr, rc, rr, beta):
    return np_softplus(-beta * ((pc - rc) - (pr - rr)))


def np_lipo(s, psi, valid):
    idx = [i for i in range(len(s)) if valid[i]]
    order = sorted(idx, key=lambda i: (-s[i], i))  # descending, ties by position
    tau = {i: r + 1 for r, i in enumerate(order)}
    total = 0.0
    for i in idx:
        for j in idx:
            if psi[i] > psi[j]:
                gain = abs((2.0 ** psi[i] - 1) - (2.0 ** psi[j] - 1))
                disc = abs(1 / np.log2(1 + tau[i]) - 1 / np.log2(1 + tau[j]))
                total += gain * disc * np_softplus(-(s[i] - s[j]))
    return total


def np_pairwise(s, psi, valid):
    losses = [np_softplus(-(s[i] - s[j])) for i, j in itertools.permutations(range(len(s)), 2)
              if valid[i] and valid[j] and psi[i] > psi[j]]
    return float(np.mean(losses)) if losses else 0.0


def np_list_mle(s, psi, valid):
    """Plackett-Luce over the label order; ties: k competes with itself and strictly lower."""
    idx = [i for i in range(len(s)) if valid[i]]
    total = 0.0
    for k in idx:
        rest = [j for j in idx if psi[j] < psi[k] or j == k]
        total -= s[k] - logsumexp([s[j] for j in rest])
    return total


def np_list_mle_sorted(s, psi):
    """Textbook Plackett-Luce (no ties): sort best-first, sum over prefixes."""
    order = np.argsort(-psi, kind="stable")
    ss = s[order]
    return -sum(ss[k] - logsumexp(ss[k:]) for k in range(len(ss)))


def np_listnet(s, psi, valid):
    v = np.asarray(valid, bool)
    if psi[v].sum() <= 0:
        return 0.0
    return float(-np.sum(psi[v] / psi[v].sum() * log_softmax(s[v])))


def np_infonca(s, psi, valid, alpha):
    v = np.asarray(valid, bool)
    if not v.any():
        return 0.0
    return float(-np.sum(softmax(psi[v] / alpha) * log_softmax(s[v])))


def np_pro_sorted(mean_logps, r):
    """PRO as written in the paper (distinct rewards): sort best-first, temperatures T."""
    order = np.argsort(-r)
    s, r = mean_logps[order], r[order]
    n = len(s)
    total = 0.0
    for k in range(n - 1):
        t = {i: r[k] - r[i] for i in range(k + 1, n)}
        t[k] = max(t.values())
        logits = [s[i] * t[i] for i in range(k, n)]
        total += logsumexp(logits) - s[k] * t[k]
    return total


NP_REF = {
    "lipo_lambda": (lw.lipo_lambda, 0.05, np_lipo),
    "pairwise_logistic": (lw.pairwise_logistic, BETA, np_pairwise),
    "list_mle": (lw.list_mle, BETA, np_list_mle),
    "listnet": (lw.listnet, BETA, np_listnet),
    "infonca": (lw.infonca, BETA, lambda s, psi, v: np_infonca(s, psi, v, 1.0)),
}


def random_lists(seed, shape=(4, 5), scale=10.0, labels_max=3):
    rng = np.random.default_rng(seed)
    pl = (-rng.uniform(0, scale, shape)).astype(np.float32)
    rl = (-rng.uniform(0, scale, shape)).astype(np.float32)
    psi = rng.integers(0, labels_max, shape).astype(np.float32)  # many ties
    mask = rng.uniform(size=shape) > 0.2
    return pl, rl, psi, mask


@pytest.mark.parametrize("name", sorted(NP_REF))
@pytest.mark.parametrize("scale", [10.0, 1e4])
def test_matches_numpy(name, scale):
    fn, beta, ref = NP_REF[name]
    pl, rl, psi, mask = random_lists(0, scale=scale)
    got = np.asarray(jax.jit(fn, static_argnames="beta")(pl, rl, psi, where=mask, beta=beta))
    assert got.shape == (4,) and np.all(np.isfinite(got))
    s = np_scores(pl, rl, beta)
    want = [ref(s[b], psi[b], mask[b]) for b in range(4)]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-3 if scale > 100 else 1e-5)


def test_list_mle_without_ties_is_textbook_plackett_luce():
    pl, rl, _, _ = random_lists(1)
    psi = np.array([3.0, 0.0, 4.0, 1.0, 2.0], np.float32)
    got = J(lw.list_mle)(pl[0], rl[0], psi)
    np.testing.assert_allclose(got, np_list_mle_sorted(np_scores(pl[0], rl[0], BETA), psi),
                               rtol=1e-5)


def test_list_mle_is_invariant_to_order_of_tied_entries():
    pl, rl, _, _ = random_lists(2)
    psi = np.array([2.0, 1.0, 1.0, 0.0, 1.0], np.float32)
    perm = np.array([0, 4, 2, 3, 1])  # permutes the tied (ψ=1) entries
    a = J(lw.list_mle)(pl[0], rl[0], psi)
    b = J(lw.list_mle)(pl[0][perm], rl[0][perm], psi[perm])
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_pro_matches_paper_formula_without_ties(scale):
    rng = np.random.default_rng(3)
    s = (-rng.uniform(0, scale, (3, 4))).astype(np.float32)
    r = np.stack([rng.permutation(4) for _ in range(3)]).astype(np.float32) * 0.7
    nll = rng.uniform(0, 2, 3).astype(np.float32)
    got = J(lw.pro)(s, r, nll, sft_weight=0.05)
    want = [np_pro_sorted(s[b].astype(np.float64), r[b]) + 0.05 * nll[b] for b in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_pro_ties_do_not_depend_on_order():
    s = np.array([-1.0, -2.0, -0.5, -3.0], np.float32)
    r = np.array([2.0, 1.0, 1.0, 0.0], np.float32)
    perm = np.array([0, 2, 1, 3])
    np.testing.assert_allclose(J(lw.pro)(s, r, 0.0), J(lw.pro)(s[perm], r[perm], 0.0), rtol=1e-6)


@pytest.mark.parametrize("name", ["pairwise_logistic", "list_mle", "listnet", "infonca"])
def test_two_entries_equal_dpo(name):
    fn = getattr(lw, name)
    pl, rl, _, _ = random_lists(4, shape=(6, 2), scale=50.0)
    labels = np.array([1.0, 0.0], np.float32)
    kwargs = {"alpha": 1e-3} if name == "infonca" else {}  # one-hot target
    got = J(fn)(pl, rl, labels, beta=0.3, **kwargs)
    want = np_dpo(pl[:, 0], pl[:, 1], rl[:, 0], rl[:, 1], 0.3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_lipo_lambda_two_entries_is_weighted_dpo():
    pl, rl, _, _ = random_lists(5, shape=(6, 2), scale=50.0)
    got = J(lw.lipo_lambda)(pl, rl, np.array([1.0, 0.0]), beta=0.3)
    want = (1 - 1 / np.log2(3)) * np_dpo(pl[:, 0], pl[:, 1], rl[:, 0], rl[:, 1], 0.3)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_lambda_weights_zero_for_equal_labels_and_reverse_pairs():
    scores = jnp.array([0.3, -1.0, 2.0, 0.5])
    psi = jnp.array([1.0, 1.0, 2.0, 0.0])
    w = np.asarray(J(lw.lambda_weights)(scores, psi))
    assert w[0, 1] == 0 and w[1, 0] == 0  # equal labels
    assert np.all(w[psi[:, None] <= psi[None, :]] == 0)
    assert np.all(w[np.asarray(psi[:, None] > psi[None, :])] > 0)


def test_ranks_with_ties_and_mask():
    r = J(lw.ranks)(jnp.array([1.0, 5.0, 1.0, 9.0, 3.0]), jnp.array([1, 1, 1, 0, 1], bool))
    np.testing.assert_array_equal(np.asarray(r)[[0, 1, 2, 4]], [3.0, 1.0, 4.0, 2.0])


ALL = ["lipo_lambda", "pairwise_logistic", "list_mle", "listnet", "infonca", "pro"]


def eager_call(name, pl, rl, psi, **kw):
    if name == "pro":
        return lw.pro(pl, psi, jnp.zeros(jnp.shape(pl)[:-1]), **kw)
    return getattr(lw, name)(pl, rl, psi, **kw)


call = jax.jit(eager_call, static_argnums=0)  # eager op-by-op dispatch is slow on CPU


@pytest.mark.parametrize("name", ALL)
def test_masked_entries_change_nothing(name):
    pl, rl, psi, _ = random_lists(6, shape=(3, 4))
    garbage = np.full((3, 2), np.nan, np.float32)
    pad = lambda x: np.concatenate([x[:, :2], garbage, x[:, 2:]], axis=-1)
    mask = np.array([True, True, False, False, True, True])
    base = call(name, pl, rl, psi)
    padded = call(name, pad(pl), pad(rl), pad(psi), where=mask)
    np.testing.assert_allclose(base, padded, rtol=1e-6)
    grads = jax.jit(jax.grad(
        lambda p: jnp.sum(eager_call(name, p, pad(rl), pad(psi), where=mask))))(pad(pl))
    assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads)[:, 2:4] == 0)


@pytest.mark.parametrize("name", ALL)
def test_all_masked_and_single_entry_give_zero(name):
    pl, rl, psi, _ = random_lists(7, shape=(2, 3))
    none = np.zeros((2, 3), bool)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: jnp.sum(eager_call(name, p, rl, psi, where=none))))(pl)
    assert float(loss) == 0.0 and np.all(np.asarray(grads) == 0)
    single = call(name, pl[:, :1], rl[:, :1], psi[:, :1])
    np.testing.assert_array_equal(single, np.zeros(2))


@pytest.mark.parametrize("name", ALL)
def test_no_nan_for_huge_and_tied_inputs(name):
    pl = np.array([[-1e4, 1e4, 0.0, 0.0], [-5e3, -5e3, -5e3, -5e3]], np.float32)
    rl = np.array([[1e4, -1e4, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    psi = np.array([[2.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: jnp.sum(eager_call(name, p, rl, psi))))(pl)
    assert np.isfinite(loss) and np.all(np.isfinite(grads))


@pytest.mark.parametrize("name", ALL)
def test_jit_equals_eager_and_vmap_equals_loop(name):
    pl, rl, psi, mask = random_lists(8, shape=(3, 2, 4))
    eager = eager_call(name, pl, rl, psi, where=mask)
    jitted = call(name, pl, rl, psi, where=mask)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
    mapped = jax.jit(jax.vmap(lambda *a: eager_call(name, *a[:3], where=a[3])))(pl, rl, psi, mask)
    looped = np.stack([call(name, pl[b], rl[b], psi[b], where=mask[b]) for b in range(3)])
    np.testing.assert_allclose(mapped, looped, rtol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_gradients_match_finite_differences(name):
    rng = np.random.default_rng(9)
    with jax.enable_x64(True):
        pl = jnp.asarray(rng.normal(0, 3, (2, 4)))  # distinct scores: ranks locally constant
        rl = jnp.asarray(rng.normal(0, 3, (2, 4)))
        psi = jnp.asarray([[2.0, 0.0, 1.0, 1.0], [0.0, 3.0, 1.0, 2.0]])
        mask = jnp.asarray([[True, True, True, False], [True] * 4])
        fn = jax.jit(lambda p, r: eager_call(name, p, r, psi, where=mask))
        check_grads(fn, (pl, rl), order=1, modes=["rev"])


def test_pro_single_entry_keeps_only_its_sft_term():
    got = J(lw.pro)(np.array([[-2.0], [-1.0]]), np.array([[1.0], [0.0]]), np.array([3.0, 1.0]),
                    sft_weight=0.5)
    np.testing.assert_allclose(got, [1.5, 0.5], rtol=1e-6)
