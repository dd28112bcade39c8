"""Tree attention: blockwise and Pallas paths equal the dense reference, memory stays O(S)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpo.models import Transformer, get_preset
from jaxpo.models.attention import Attention, TreeLayout, attend, tree_mask
from jaxpo.models.blockwise_attention import blockwise_attention
from jaxpo.models.pallas_attention import check_supported, pallas_attention

RTOL = 1e-5


def random_tree_rows(rng: np.random.Generator, batch: int, length: int):
    """Packed rows of random preference trees: several segments, sibling branches, padding.

    Each segment is a tree laid out depth-first (a prompt root, children, grandchildren, each
    node 1-5 tokens); preorder numbers count over the row. The last row is all padding.

    Returns:
      ``(segment, node_pre, node_last)``, int32 ``[B, S]`` each.
    """
    out = np.zeros((3, batch, length), np.int32)
    for b in range(batch - 1):
        pos = base = 0
        for g in range(1, 4):
            nodes = int(rng.integers(3, 7))
            parent = [-1, 0, 0] + [int(rng.integers(0, i)) for i in range(3, nodes)]
            children = [[c for c in range(nodes) if parent[c] == p] for p in range(nodes)]
            order, last = [], {}

            def visit(node, order=order, children=children, last=last):
                order.append(node)
                for child in children[node]:
                    visit(child)
                last[node] = len(order) - 1  # largest preorder number in the subtree

            visit(0)
            for pre, node in enumerate(order):
                size = int(rng.integers(1, 6))
                out[:, b, pos:pos + size] = np.array([g, base + pre, base + last[node]])[:, None]
                pos += size
            base += nodes
            if pos >= length:
                break
    return tuple(jnp.asarray(x) for x in out)


def _inputs(seed: int, batch: int, length: int, heads: int, kv_heads: int, head_dim: int = 8):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(batch, length, h, head_dim)), jnp.float32)
               for h in (heads, kv_heads, kv_heads))
    layout = random_tree_rows(rng, batch, length)
    weight = jnp.asarray(rng.normal(size=q.shape), jnp.float32)  # cotangent of the output
    return q, k, v, layout, weight


def _dense(q, k, v, segment, node_pre, node_last):
    return attend(q, k, v, tree_mask(segment, node_pre, node_last))


def _assert_close(got, want, atol_scale=1e-6):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol_scale * np.abs(want).max())


def _check_against_dense(fn, seed, batch, length, heads, kv_heads):
    q, k, v, layout, weight = _inputs(seed, batch, length, heads, kv_heads)
    real = (layout[0] != 0)[..., None, None]  # [B, S, 1, 1]; dense lets padding see itself
    weight = jnp.where(real, weight, 0.0)

    def loss(attention, q, k, v):
        return jnp.sum(attention(q, k, v, *layout) * weight)

    got, want = jax.jit(fn)(q, k, v, *layout), _dense(q, k, v, *layout)
    _assert_close(np.where(real, got, 0.0), np.where(real, want, 0.0))
    np.testing.assert_array_equal(np.where(real, 0.0, got), 0.0)  # padding queries: exactly 0
    grads = jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(q, k, v)
    want_grads = jax.jit(jax.grad(lambda *a: loss(_dense, *a), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(grads, want_grads):
        _assert_close(g, w)


def test_random_rows_have_segments_branches_and_padding():
    segment, node_pre, node_last = (np.asarray(x) for x in random_tree_rows(
        np.random.default_rng(0), 3, 64))
    assert len(set(segment[0]) - {0}) >= 2
    assert (segment[-1] == 0).all()
    mask = np.asarray(tree_mask(*map(jnp.asarray, (segment, node_pre, node_last))))
    real = segment[0] != 0
    # some earlier same-segment token is hidden from a later one: a sibling branch
    same = (segment[0][:, None] == segment[0][None]) & np.tril(np.ones((64, 64), bool), -1)
    assert (same & ~mask[0] & real[:, None]).any()


# S = 37 is not a multiple of any block; 64 > S is clipped. GQA, MHA, MQA.
@pytest.mark.parametrize("block,heads,kv_heads", [(8, 4, 2), (16, 4, 4), (64, 4, 1), (8, 4, 1)])
def test_blockwise_equals_dense_outputs_and_gradients(block, heads, kv_heads):
    def fn(*arrays):
        return blockwise_attention(*arrays, block=block)

    _check_against_dense(fn, block + heads + kv_heads, 3, 37, heads, kv_heads)


@pytest.mark.parametrize("block,heads,kv_heads", [(8, 4, 2), (16, 2, 1)])
def test_pallas_interpret_equals_dense_outputs_and_gradients(block, heads, kv_heads):
    def fn(*arrays):
        return pallas_attention(*arrays, block=block, interpret=True)

    _check_against_dense(fn, block, 3, 37, heads, kv_heads)


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_padding_row_gives_zero_and_finite_gradients(impl):
    q, k, v, layout, weight = _inputs(5, 2, 20, 2, 1)
    fn = {"blockwise": lambda *a: blockwise_attention(*a, block=8),
          "pallas": lambda *a: pallas_attention(*a, block=8, interpret=True)}[impl]
    out = fn(q, k, v, *layout)
    grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, *layout) * weight), (0, 1, 2))(q, k, v)
    np.testing.assert_array_equal(out[-1], 0.0)  # the all-padding row
    for g in grads:
        assert np.isfinite(g).all()
        np.testing.assert_array_equal(g[-1], 0.0)


def test_blockwise_bfloat16_keeps_dtype_and_is_close_to_fp32():
    q, k, v, layout, _ = _inputs(6, 2, 40, 4, 2)
    got = blockwise_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), *layout, block=16)
    want = _dense(q, k, v, *layout)
    real = (layout[0] != 0)[..., None, None]
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.where(real, got.astype(jnp.float32) - want, 0.0)).max()
    assert err < 0.05 * float(np.abs(want).max())


def test_blockwise_backward_has_no_length_squared_buffer():
    """fwd+bwd compiled at S = 16k: temporaries are far below one head's [S, S] fp32 scores."""
    length, heads, kv_heads, head_dim = 16384, 4, 2, 32
    arrays = [jax.ShapeDtypeStruct((1, length, h, head_dim), jnp.float32)
              for h in (heads, kv_heads, kv_heads)]
    arrays += [jax.ShapeDtypeStruct((1, length), jnp.int32)] * 3

    def temp_bytes(fn):
        grad = jax.grad(lambda q, k, v, *t: jnp.sum(fn(q, k, v, *t)), argnums=(0, 1, 2))
        return jax.jit(grad).lower(*arrays).compile().memory_analysis().temp_size_in_bytes

    blockwise = temp_bytes(lambda *a: blockwise_attention(*a, block=512))
    dense = temp_bytes(_dense)
    assert dense > length * length * 4 * heads  # the reference does hold [H, S, S] scores
    assert blockwise < length * length * 4 / 8  # an eighth of ONE head's [S, S] fp32
    assert blockwise < 0.02 * dense


@pytest.mark.parametrize("attention", ["blockwise", "pallas"])
def test_model_hidden_and_gradients_equal_dense(attention):
    cfg = get_preset("tiny-qwen3", vocab_size=64, attention_block=8, pallas_block=8)
    rng = np.random.default_rng(7)
    layout = random_tree_rows(rng, 3, 30)  # S = 30, not a multiple of the block
    tokens = jnp.asarray(rng.integers(0, 64, (3, 30)))
    positions = jnp.asarray(rng.integers(0, 30, (3, 30)))
    real = (layout[0] != 0)[..., None]
    weight = jnp.asarray(rng.normal(size=(3, 30, cfg.hidden_size)), jnp.float32)

    def loss(model):
        hidden = model.hidden(tokens, positions, *layout)  # [B, S, D]
        return jnp.sum(jnp.where(real, hidden, 0.0) * weight), hidden

    results = {}
    for name in ("dense", attention):
        model = Transformer(cfg.replace(attention=name), rngs=nnx.Rngs(0))
        (_, hidden), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        results[name] = np.where(real, hidden, 0.0), jax.tree.leaves(grads)
    _assert_close(results[attention][0], results["dense"][0])
    for got, want in zip(results[attention][1], results["dense"][1]):
        # Two layers of fp32 rounding: dense and jax.nn's attention already differ by ~7e-7
        # of the largest gradient here.
        _assert_close(got, want, atol_scale=1e-5)


def test_config_default_and_choices():
    cfg = get_preset("tiny")
    assert (cfg.attention, cfg.attention_block, cfg.pallas_block) == ("blockwise", 512, 128)
    with pytest.raises(ValueError, match="attention"):
        cfg.replace(attention="flash")
    with pytest.raises(ValueError, match="attention_block"):
        cfg.replace(attention_block=0)


@pytest.mark.parametrize("backend,head_dim,match", [
    ("gpu", 24, "head_dim a power of two"),
    ("tpu", 128, None),
    ("metal", 128, "no kernel for the 'metal' backend"),
])
def test_pallas_unsupported_names_blockwise(monkeypatch, backend, head_dim, match):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    if match is None:
        assert check_supported(128, head_dim, None) is False
        with pytest.raises(ValueError, match="attention=blockwise"):
            check_supported(12, head_dim, None)
        return
    with pytest.raises(ValueError, match=match) as err:
        check_supported(128, head_dim, None)
    assert "--config.model.attention=blockwise" in str(err.value)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_pallas_kernels_lower_for_gpu_and_tpu(monkeypatch, platform):
    """Forward and backward lower to Triton (CUDA) and Mosaic (TPU) from this CPU-only machine.

    Lowering checks what the kernels use is supported by each backend's Pallas lowering; it does
    not compile or run them (that needs the device).
    """
    from jax import export

    monkeypatch.setattr(jax, "default_backend", lambda: {"cuda": "gpu", "tpu": "tpu"}[platform])
    if platform == "tpu":  # Mosaic asks the default device which TPU it targets
        tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
        monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5p")
        monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    shapes = [(1, 256, h, 128) for h in (4, 2, 2)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    args += [jax.ShapeDtypeStruct((1, 256), jnp.int32)] * 3

    def loss(q, k, v, *layout):
        return jnp.sum(pallas_attention(q, k, v, *layout, block=128))

    grads = jax.grad(loss, argnums=(0, 1, 2))

    checks = [export.DisabledSafetyCheck.custom_call(name)
              for name in ("__gpu$xla.gpu.triton", "tpu_custom_call")]
    text = export.export(jax.jit(grads), platforms=[platform], disabled_checks=checks)(
        *args).mlir_module()
    assert text.count("tree_attention") >= 3  # forward, dQ and dK/dV kernels


def test_cache_with_tree_layout_is_an_error():
    cfg = get_preset("tiny", vocab_size=64)
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 4, cfg.hidden_size))
    ones = jnp.ones((1, 4), jnp.int32)
    cache = (jnp.zeros((1, 8, cfg.num_kv_heads, cfg.head_dim)),) * 2
    with pytest.raises(ValueError, match="explicit"):
        attn(x, ones, TreeLayout(ones, ones * 0, ones * 0), cache, 0)
