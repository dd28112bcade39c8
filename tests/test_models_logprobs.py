"""Chunked log-probs, extras and node/response sums against independent numpy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpo.models import logprobs as lp

B, S, D, V = 2, 7, 6, 37


def _inputs(seed=0, scale=1.5):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((B, S, D)).astype(np.float32)
    unemb = (scale * rng.standard_normal((V, D))).astype(np.float32)
    tokens = rng.integers(0, V, (B, S)).astype(np.int32)
    pred = np.arange(S, dtype=np.int32)[None].repeat(B, 0) - 1  # q - 1
    pred[0, 3] = 1  # a branch: first token of a node predicted by its parent's last token
    pred[1, :3] = -1  # unscored prompt
    return hidden, unemb, tokens, pred


def _np_log_softmax(hidden, unemb, pred):
    """[B, S, V] float64 log-probs of the output at pred_index (rows of unscored positions = 0)."""
    h = np.take_along_axis(hidden.astype(np.float64), np.maximum(pred, 0)[..., None], 1)
    logits = h @ unemb.astype(np.float64).T
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _np_logps(hidden, unemb, tokens, pred):
    logp = _np_log_softmax(hidden, unemb, pred)
    picked = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    return np.where(pred >= 0, picked, 0.0)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16])
def test_token_logps_equals_log_softmax_gather(chunk_size):
    hidden, unemb, tokens, pred = _inputs()
    got = lp.token_logps(hidden, unemb, tokens, pred, chunk_size=chunk_size)
    assert got.dtype == jnp.float32 and got.shape == (B, S)
    np.testing.assert_allclose(got, _np_logps(hidden, unemb, tokens, pred), atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(got)[pred < 0] == 0.0)


def test_token_logps_jit_equals_eager():
    args = _inputs(1)
    f = lambda *a: lp.token_logps(*a, chunk_size=4)
    np.testing.assert_allclose(jax.jit(f)(*args), f(*args), atol=1e-6)


def test_gradients_equal_analytic():
    hidden, unemb, tokens, pred = _inputs(2)
    weights = np.random.default_rng(3).standard_normal((B, S)).astype(np.float32)

    def loss(h, w):
        return jnp.sum(weights * lp.token_logps(h, w, tokens, pred, chunk_size=3))

    dh, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(hidden, unemb)
    # d log p_t / d logits = onehot_t - p; logits = h[pred] @ W.T.
    p = np.exp(_np_log_softmax(hidden, unemb, pred))  # [B, S, V]
    g = np.where(pred >= 0, weights, 0.0)[..., None] * (np.eye(V)[tokens] - p)  # [B, S, V]
    h = np.take_along_axis(hidden.astype(np.float64), np.maximum(pred, 0)[..., None], 1)
    want_dw = np.einsum("bsv,bsd->vd", g, h)
    want_dh = np.zeros_like(hidden, np.float64)
    for b in range(B):
        for s in range(S):
            if pred[b, s] >= 0:
                want_dh[b, pred[b, s]] += g[b, s] @ unemb
    np.testing.assert_allclose(dh, want_dh, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dw, want_dw, atol=1e-5, rtol=1e-5)


def test_extras_equal_naive():
    hidden, unemb, tokens, pred = _inputs(4)
    ref_hidden, ref_unemb, _, _ = _inputs(5, scale=1.0)
    out = lp.token_stats(hidden, unemb, tokens, pred, ref_hidden=ref_hidden,
                         ref_unembedding=ref_unemb, chunk_size=4, with_entropy=True,
                         with_sq=True)
    assert set(out) == {"logps", "entropy", "log_sq", "ref_logps", "kl"}
    logp = _np_log_softmax(hidden, unemb, pred)
    ref_logp = _np_log_softmax(ref_hidden, ref_unemb, pred)
    p, q = np.exp(logp), np.exp(ref_logp)
    scored = pred >= 0
    want = {
        "logps": _np_logps(hidden, unemb, tokens, pred),
        "entropy": -(p * logp).sum(-1),
        "log_sq": np.log((p**2).sum(-1)),
        "ref_logps": _np_logps(ref_hidden, ref_unemb, tokens, pred),
        "kl": (q * (ref_logp - logp)).sum(-1),
    }
    for name, value in want.items():
        np.testing.assert_allclose(out[name], np.where(scored, value, 0.0), atol=1e-5,
                                   rtol=1e-5, err_msg=name)


def test_reference_gets_no_gradient_and_kl_gradient_is_right():
    hidden, unemb, tokens, pred = _inputs(6)
    ref_hidden, ref_unemb, _, _ = _inputs(7)

    def kl_sum(h, w, rh, rw):
        out = lp.token_stats(h, w, tokens, pred, ref_hidden=rh, ref_unembedding=rw,
                             chunk_size=5)
        return out["kl"].sum()

    dh, dw, drh, drw = jax.grad(kl_sum, argnums=(0, 1, 2, 3))(hidden, unemb, ref_hidden,
                                                               ref_unemb)
    assert not np.any(drh) and not np.any(drw)  # the reference is frozen
    # d KL(q || p) / d logits_p = p - q.
    p = np.exp(_np_log_softmax(hidden, unemb, pred))
    q = np.exp(_np_log_softmax(ref_hidden, ref_unemb, pred))
    g = np.where(pred >= 0, 1.0, 0.0)[..., None] * (p - q)
    h = np.take_along_axis(hidden.astype(np.float64), np.maximum(pred, 0)[..., None], 1)
    np.testing.assert_allclose(dw, np.einsum("bsv,bsd->vd", g, h), atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(dh))


def test_bf16_inputs_give_fp32_logps():
    hidden, unemb, tokens, pred = _inputs(8)
    h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(unemb, jnp.bfloat16)
    got = lp.token_logps(h16, w16, tokens, pred, chunk_size=4)
    assert got.dtype == jnp.float32
    want = _np_logps(np.asarray(h16, np.float32), np.asarray(w16, np.float32), tokens, pred)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_all_unscored_gives_zero_and_finite_gradient():
    hidden, unemb, tokens, _ = _inputs(9)
    pred = -np.ones((B, S), np.int32)
    value, grads = jax.value_and_grad(
        lambda h, w: lp.token_logps(h, w, tokens, pred, chunk_size=4).sum(), argnums=(0, 1)
    )(hidden, unemb)
    assert float(value) == 0.0
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: (a[0][0], *a[1:]), "hidden must be"),
        (lambda a: (a[0], a[1][:, :3], *a[2:]), "unembedding must be"),
        (lambda a: (*a[:2], a[2][:, :3], a[3]), "tokens"),
    ],
)
def test_bad_shapes_are_clear_errors(change, match):
    with pytest.raises(ValueError, match=match):
        lp.token_logps(*change(_inputs()))


def test_reference_needs_both_arrays():
    hidden, unemb, tokens, pred = _inputs()
    with pytest.raises(ValueError, match="ref_unembedding"):
        lp.token_stats(hidden, unemb, tokens, pred, ref_hidden=hidden)


def _random_layout(seed, R=3, S=10, N=4, NG=3, K=2, M=3):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((R, S)).astype(np.float32)
    node_slot = np.sort(rng.integers(0, N, (R, S)), axis=1).astype(np.int32)
    pred = np.where(rng.random((R, S)) < 0.7, 0, -1).astype(np.int32)
    ids = rng.integers(-1, R * N, (NG, K, M)).astype(np.int32)
    return values, node_slot, pred, ids, N


def test_node_sums_and_gather_steps_equal_loops():
    values, node_slot, pred, ids, N = _random_layout(10)
    R, S = values.shape
    want_nodes = np.zeros(R * N)
    for r in range(R):
        for s in range(S):
            if pred[r, s] >= 0:
                want_nodes[r * N + node_slot[r, s]] += values[r, s]
    nodes = lp.node_sums(values, node_slot, pred >= 0, N)
    np.testing.assert_allclose(nodes, want_nodes, atol=1e-6)
    steps = lp.gather_steps(nodes, ids)
    want_steps = np.array([[[want_nodes[i] if i >= 0 else 0.0 for i in path] for path in g]
                           for g in ids])
    np.testing.assert_allclose(steps, want_steps, atol=1e-6)


def test_response_logps_equal_loops():
    values, node_slot, pred, ids, N = _random_layout(11)
    got = jax.jit(lp.response_logps, static_argnums=4)(values, node_slot, pred, ids, N)
    NG, K, M = ids.shape
    want_sum, want_count = np.zeros((NG, K)), np.zeros((NG, K))
    want_step = np.zeros((NG, K, M))
    for g in range(NG):
        for k in range(K):
            for m in range(M):
                i = ids[g, k, m]
                if i < 0:
                    continue
                row, slot = divmod(int(i), N)
                mask = (node_slot[row] == slot) & (pred[row] >= 0)
                want_step[g, k, m] = values[row][mask].sum()
                want_count[g, k] += mask.sum()
            want_sum[g, k] = want_step[g, k].sum()
    np.testing.assert_allclose(got.logps, want_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.step_logps, want_step, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.token_counts, want_count)
    np.testing.assert_allclose(got.step_counts.sum(-1), want_count)
