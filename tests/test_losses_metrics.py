"""preference_metrics against numpy loops and scipy.stats.kendalltau."""

import jax
import numpy as np
import pytest
from scipy.stats import kendalltau

import jaxpo.losses as L

metrics_fn = jax.jit(L.preference_metrics, static_argnames=("beta", "logps"))


def make(p, r, psi, mask, group=None, num_tokens=None):
    ng, k = p.shape
    return L.LossInputs(
        policy_logps=np.float32(p), reference_logps=None if r is None else np.float32(r),
        scores=np.float32(psi), response_mask=np.asarray(mask, bool),
        group_mask=np.ones(ng, bool) if group is None else np.asarray(group, bool),
        num_tokens=np.ones((ng, k), np.int32) if num_tokens is None else num_tokens)


def np_metrics(p, r, psi, mask, group, beta):
    """Loop over groups; chosen = first best label, rejected = last worst label."""
    out = {k: [] for k in ["chosen", "rejected", "margin", "acc", "lc", "lr", "racc", "tau",
                           "ndcg"]}
    for g in range(p.shape[0]):
        idx = [i for i in range(p.shape[1]) if mask[g, i] and group[g]]
        if not idx:
            continue
        rew = beta * (p[g].astype(np.float64) - (0 if r is None else r[g]))
        best = max(idx, key=lambda i: (psi[g, i], -i))
        worst = min(idx, key=lambda i: (psi[g, i], -i))
        if len(idx) >= 2 or psi[g, best] > 0:
            out["chosen"].append(rew[best]), out["lc"].append(p[g, best])
        if len(idx) >= 2 or psi[g, best] <= 0:
            out["rejected"].append(rew[worst]), out["lr"].append(p[g, worst])
        if len(idx) >= 2:
            out["margin"].append(rew[best] - rew[worst])
            out["acc"].append(float(rew[best] > rew[worst]))
        pairs = [(i, j) for i in idx for j in idx if psi[g, i] > psi[g, j]]
        if pairs:
            conc = sum(rew[i] > rew[j] for i, j in pairs)
            disc = sum(rew[i] < rew[j] for i, j in pairs)
            out["racc"].append(conc / len(pairs))
            out["tau"].append((conc - disc) / len(pairs))
        gains = {i: 2.0 ** psi[g, i] - 1 for i in idx}
        by_reward = sorted(idx, key=lambda i: (-np.float32(rew[i]), i))
        by_label = sorted(idx, key=lambda i: (-psi[g, i], i))
        dcg = sum(gains[i] / np.log2(n + 2) for n, i in enumerate(by_reward))
        ideal = sum(gains[i] / np.log2(n + 2) for n, i in enumerate(by_label))
        if ideal > 0:
            out["ndcg"].append(dcg / ideal)
    mean = lambda v: float(np.mean(v)) if v else 0.0
    return {
        "rewards/chosen": mean(out["chosen"]), "rewards/rejected": mean(out["rejected"]),
        "rewards/margins": mean(out["margin"]), "rewards/accuracies": mean(out["acc"]),
        "logps/chosen": mean(out["lc"]), "logps/rejected": mean(out["lr"]),
        "ranking/accuracy": mean(out["racc"]), "ranking/kendall_tau": mean(out["tau"]),
        "ranking/ndcg": mean(out["ndcg"]),
    }


def check(got, want, keys):
    assert set(got) == set(keys)
    for key in keys:
        np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5, atol=1e-6, err_msg=key)


PAIR_KEYS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected"]
LIST_KEYS = PAIR_KEYS + ["ranking/accuracy", "ranking/ndcg", "ranking/kendall_tau"]


def test_pairs_follow_trl_semantics():
    rng = np.random.default_rng(0)
    p, r = rng.normal(-30, 5, (6, 2)), rng.normal(-30, 5, (6, 2))
    group = np.array([1, 1, 1, 1, 1, 0], bool)
    got = metrics_fn(make(p, r, np.tile([1.0, 0.0], (6, 1)), np.ones((6, 2)), group), beta=0.1)
    c, j = 0.1 * (p[:5, 0] - r[:5, 0]), 0.1 * (p[:5, 1] - r[:5, 1])  # TRL, padding dropped
    want = {"rewards/chosen": c.mean(), "rewards/rejected": j.mean(),
            "rewards/margins": (c - j).mean(), "rewards/accuracies": (c > j).mean(),
            "logps/chosen": p[:5, 0].mean(), "logps/rejected": p[:5, 1].mean()}
    check(got, want, PAIR_KEYS)


@pytest.mark.parametrize("seed", [1, 2])
def test_lists_with_masks_and_ties_match_numpy(seed):
    rng = np.random.default_rng(seed)
    p, r = rng.normal(-30, 5, (8, 5)), rng.normal(-30, 5, (8, 5))
    p[0, 1], r[0, 1] = p[0, 2], r[0, 2]  # an exact reward tie
    psi = rng.integers(0, 3, (8, 5)).astype(np.float64)
    psi[0, 1:3] = [2.0, 0.0]  # ... between differently labelled responses
    mask = rng.uniform(size=(8, 5)) > 0.25
    mask[0] = True  # keeps the tie
    mask[1] = False  # an empty group
    mask[2] = [True, False, False, False, False]  # a single response
    group = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)
    got = metrics_fn(make(p, r, psi, mask, group), beta=0.5)
    want = np_metrics(np.float32(p), np.float32(r), psi, mask, group, 0.5)
    check(got, want, LIST_KEYS)


def test_kendall_tau_matches_scipy_without_ties():
    rng = np.random.default_rng(3)
    p, r = rng.normal(-30, 5, (4, 6)), np.zeros((4, 6))
    psi = np.stack([rng.permutation(6) for _ in range(4)]).astype(np.float64)
    got = metrics_fn(make(p, r, psi, np.ones((4, 6))), beta=1.0)
    want = np.mean([kendalltau(psi[g], np.float32(p[g])).statistic for g in range(4)])
    np.testing.assert_allclose(float(got["ranking/kendall_tau"]), want, rtol=1e-5)
    perfect = metrics_fn(make(psi, r, psi, np.ones((4, 6))), beta=1.0)
    assert float(perfect["ranking/ndcg"]) == pytest.approx(1.0)
    assert float(perfect["ranking/accuracy"]) == 1.0


def test_unpaired_groups_split_by_label_and_reference_free_rewards():
    p = np.array([[-3.0], [-5.0], [-7.0]])
    psi = np.array([[1.0], [0.0], [1.0]])
    got = metrics_fn(make(p, None, psi, np.ones((3, 1))), beta=2.0)
    assert float(got["rewards/chosen"]) == pytest.approx(2.0 * -5.0)  # mean of −3, −7
    assert float(got["rewards/rejected"]) == pytest.approx(2.0 * -5.0)
    assert float(got["rewards/margins"]) == 0.0 and float(got["rewards/accuracies"]) == 0.0
    assert float(got["logps/chosen"]) == pytest.approx(-5.0)


def test_mean_logps_and_empty_batch():
    p, r = np.array([[-4.0, -8.0]]), np.array([[-6.0, -6.0]])
    inputs = make(p, r, np.array([[1.0, 0.0]]), np.ones((1, 2)), num_tokens=np.array([[2, 4]]))
    got = metrics_fn(inputs, beta=1.0, logps="mean")
    assert float(got["rewards/chosen"]) == pytest.approx(-2.0 - -3.0)
    assert float(got["rewards/rejected"]) == pytest.approx(-2.0 - -1.5)
    empty = metrics_fn(make(p, r, np.array([[1.0, 0.0]]), np.zeros((1, 2))), beta=1.0)
    assert all(float(v) == 0.0 for v in empty.values())
