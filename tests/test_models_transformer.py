"""Transformer: tree-packed attention, attention paths, remat, dtypes, logical axis names, and
scanned layers (compiled size independent of depth)."""

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpo.models import Transformer, get_preset, tree_mask
from jaxpo.models.attention import attend

VOCAB = 64


@pytest.fixture(scope="module")
def model():
    return Transformer(get_preset("tiny-qwen3", vocab_size=VOCAB), rngs=nnx.Rngs(0))


@nnx.jit
def _hidden(model, *arrays):
    return model.hidden(*arrays)


def test_tree_mask_matches_brute_force():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 3, (2, 12))
    pre = rng.integers(0, 4, (2, 12))
    last = pre + rng.integers(0, 3, (2, 12))
    got = np.asarray(tree_mask(jnp.asarray(seg), jnp.asarray(pre), jnp.asarray(last)))
    for b, q, k in itertools.product(range(2), range(12), range(12)):
        want = (seg[b, k] == seg[b, q] != 0 and k <= q
                and pre[b, k] <= pre[b, q] <= last[b, k]) or q == k
        assert got[b, q, k] == want, (b, q, k)


@pytest.mark.parametrize("attention", ["blockwise", "dense", "pallas"])
def test_packed_tree_row_equals_each_response_alone(attention):
    # Blocks of 4 over S = 14: the blockwise / Pallas paths pad and skip blocks.
    cfg = get_preset("tiny-qwen3", vocab_size=VOCAB, attention=attention, attention_block=4,
                     pallas_block=4)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    prompt, resp_a, resp_b, other = (rng.integers(0, VOCAB, n) for n in (3, 4, 2, 3))
    # Row: [group 1: prompt, response A, response B] [group 2: one sequence] [2 pads].
    tokens = np.concatenate([prompt, resp_a, resp_b, other, [0, 0]])
    positions = np.concatenate([np.arange(3), 3 + np.arange(4), 3 + np.arange(2),
                                np.arange(3), [0, 0]])
    segment = np.array([1] * 9 + [2] * 3 + [0, 0])
    node_pre = np.array([0] * 3 + [1] * 4 + [2] * 2 + [0] * 3 + [0, 0])
    node_last = np.array([2] * 3 + [1] * 4 + [2] * 2 + [0] * 3 + [0, 0])
    # Each sequence alone, right-padded to the row length (padding never affects earlier
    # causal positions), run in the same batch as the packed row: one compilation.
    alone = [np.concatenate([prompt, resp_a]), np.concatenate([prompt, resp_b]), other]
    size = len(tokens)
    causal = [np.ones(size, int), np.zeros(size, int), np.zeros(size, int)]
    batch = [(tokens, positions, segment, node_pre, node_last)]
    batch += [(np.pad(seq, (0, size - len(seq))), np.arange(size), *causal) for seq in alone]
    arrays = [jnp.asarray(np.stack(column)) for column in zip(*batch)]
    hidden = np.asarray(_hidden(model, *arrays))  # [4, S, D]
    packed, alone_a, alone_b, alone_other = hidden[0], hidden[1][:7], hidden[2][:5], hidden[3][:3]
    np.testing.assert_allclose(packed[:3], alone_a[:3], atol=1e-5)
    np.testing.assert_allclose(packed[3:7], alone_a[3:], atol=1e-5)
    np.testing.assert_allclose(packed[7:9], alone_b[3:], atol=1e-5)
    np.testing.assert_allclose(packed[9:12], alone_other, atol=1e-5)
    assert np.isfinite(packed).all()  # padding rows included


def test_causal_logits_are_causal(model):
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (1, 6)))
    changed = tokens.at[0, 4].set((tokens[0, 4] + 1) % VOCAB)
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.concatenate([tokens, changed])))
    a, b = logits[:1], logits[1:]
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-4
    assert a.shape == (1, 6, VOCAB) and a.dtype == np.float32


def test_dense_attention_matches_numpy_and_dot_product():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 7, 2, 8)).astype(np.float32)
    v = rng.normal(size=(2, 7, 2, 8)).astype(np.float32)
    mask = rng.random((2, 5, 7)) < 0.6
    mask[:, :, 0] = True
    want = np.zeros_like(q)
    for b, t, h in itertools.product(range(2), range(5), range(4)):
        s = k[b, :, h // 2] @ q[b, t, h] / np.sqrt(8)
        s = np.where(mask[b, t], s, -np.inf)
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        want[b, t, h] = p @ v[b, :, h // 2]
    args = [jnp.asarray(a) for a in (q, k, v, mask)]
    np.testing.assert_allclose(attend(*args, impl="dense"), want, atol=1e-5)
    np.testing.assert_allclose(attend(*args, impl="dot_product"), want, atol=1e-5)


def test_remat_modes_give_same_loss_and_grads():
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (2, 6)))
    results = []
    for remat in ("none", "block", "full"):
        cfg = get_preset("tiny", vocab_size=VOCAB, num_layers=1, remat=remat)
        m = Transformer(cfg, rngs=nnx.Rngs(0))
        loss, grads = nnx.jit(nnx.value_and_grad(lambda m: jnp.mean(m(tokens) ** 2)))(m)
        results.append((loss, jax.tree.leaves(grads)))
    for remat in ("none", "full"):  # the remat primitive is in the backward pass iff asked for
        cfg = get_preset("tiny", vocab_size=VOCAB, num_layers=1, remat=remat)
        graphdef, state = nnx.split(nnx.eval_shape(lambda cfg=cfg: Transformer(cfg, rngs=nnx.Rngs(0))))
        grad = jax.grad(lambda s, g=graphdef: jnp.mean(nnx.merge(g, s)(tokens)))
        assert ("remat" in str(jax.make_jaxpr(grad)(state))) == (remat == "full")
    for loss, grads in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-6)
        for g, g0 in zip(grads, results[0][1]):
            np.testing.assert_allclose(g, g0, atol=1e-6)


def test_bf16_params_and_compute():
    cfg = get_preset("tiny", vocab_size=VOCAB, num_layers=1, dtype="bfloat16",
                     param_dtype="bfloat16")
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    f32 = Transformer(cfg.replace(dtype="float32", param_dtype="float32"), rngs=nnx.Rngs(0))
    tokens = jnp.arange(8)[None]
    run = nnx.jit(lambda m, t: (m(t), m.hidden(t, t, jnp.ones_like(t), t * 0, t * 0)))
    (logits, hidden), (ref, _) = run(m, tokens), run(f32, tokens)
    assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
    assert float(jnp.abs(logits - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_parameters_carry_logical_axis_names(model):
    names = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        spec = var.get_metadata()["out_sharding"]
        assert len(spec) == var.get_value().ndim, path
        names[".".join(map(str, path))] = spec
    assert names["embed"] == ("vocab", "embed")
    assert names["lm_head"] == ("vocab", "embed")
    # The blocks are stacked: one parameter per kind with a leading layer axis.
    assert names["layers.attn.q"] == ("layers", "embed", "heads", "head_dim")
    assert names["layers.attn.k"] == ("layers", "embed", "kv_heads", "head_dim")
    assert names["layers.attn.o"] == ("layers", "heads", "head_dim", "embed")
    assert names["layers.mlp.down"] == ("layers", "mlp", "embed")
    assert names["layers.attn.q_norm.scale"] == ("layers", "head_dim")
    assert names["layers.attn_norm.scale"] == ("layers", "embed")
    assert names["norm.scale"] == ("embed",)
    assert model.layers.attn.q.get_value().shape == (2, 64, 4, 16)  # [L, D, H, hd]
    assert model.unembedding().shape == (VOCAB, 64)


def _lowered_step(num_layers, remat):
    """fwd+bwd of a tiny-width model with ``num_layers`` layers, lowered (not compiled)."""
    cfg = get_preset("tiny", vocab_size=VOCAB, num_layers=num_layers, remat=remat)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

    def loss(state, tokens):
        return jnp.mean(nnx.merge(graphdef, state)(tokens) ** 2)

    return jax.jit(jax.grad(loss)).lower(state, jax.ShapeDtypeStruct((2, 16), jnp.int32))


@pytest.mark.parametrize("remat", ["none", pytest.param("block", marks=pytest.mark.slow),
                                   pytest.param("full", marks=pytest.mark.slow)])
def test_depth_does_not_grow_the_compiled_step(remat):
    # The layers are one scanned block: 32 layers lower to the HLO of 4 (a Python loop over
    # the layers grows it ~linearly: 0.35 MB -> 2.7 MB of HLO text for 4 -> 32 layers).
    # Deterministic, unlike compile times on a shared machine, which are printed only.
    sizes, seconds = {}, {}
    for layers in (4, 32):
        lowered = _lowered_step(layers, remat)
        sizes[layers] = len(lowered.as_text())
        if remat == "block":
            start = time.perf_counter()
            lowered.compile()
            seconds[layers] = round(time.perf_counter() - start, 2)
    print(f"remat={remat}: HLO text {sizes} chars, compile seconds {seconds}")
    assert sizes[32] < 1.5 * sizes[4]
