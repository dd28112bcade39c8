"""The three layouts give the same response log-probs through a tiny random decoder (fp32, 1e-5),
also with rows sized from the data (``resolve_batch_shapes``).

Each layout's batch goes through ``model.hidden`` + ``jaxpo.models.logprobs``; the reference is
every (prompt, response) run on its own through the model's plain causal path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data_layout import groups_st, make_group

from jaxpo.config import DataConfig
from jaxpo.data import make_eval_iterator, resolve_batch_shapes
from jaxpo.data.batcher import BatchConfig, pack_groups
from jaxpo.models import Transformer, get_preset
from jaxpo.models.logprobs import response_logps, token_logps

VOCAB, NG, K, M, N = 100, 3, 6, 3, 24
SEQ_LEN = {"padded": 16, "packed": 96, "share_prefix": 28}  # room for any drawn group
ALONE = 16  # prompt (<= 4) + a path of <= 3 steps of <= 4 tokens


@pytest.fixture(scope="module")
def model():
    cfg = get_preset("tiny", vocab_size=VOCAB, num_layers=2, dtype="float32",
                     param_dtype="float32", initializer_range=0.5)
    return Transformer(cfg, rngs=nnx.Rngs(0))


@nnx.jit
def batch_logps(model, b):
    hidden = model.hidden(b["tokens"], b["positions"], b["segment"], b["node_pre"],
                          b["node_last"])  # [R, S, D]
    lp = token_logps(hidden, model.unembedding(), b["tokens"], b["pred_index"], chunk_size=8)
    return response_logps(lp, b["node_slot"], b["pred_index"], b["response_nodes"], N).logps


@nnx.jit
def causal_logps(model, tokens):
    logits = model(tokens)  # [B, T, V]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]


def alone_logps(model, groups):
    """{(group, k): log-prob} with each prompt + response run alone, causally."""
    keys, rows, spans = [], [], []
    for g in groups:
        for k in range(g.num_responses):
            prompt, resp = g.node_tokens[0], g.response_tokens(k)
            seq = np.concatenate([prompt, resp])
            rows.append(np.pad(seq, (0, ALONE - len(seq))))
            spans.append((len(prompt) - 1, len(seq) - 1))
            keys.append((g.id, k))
    rows += [np.zeros(ALONE, np.int64)] * (NG * K - len(rows))  # one shape: one compilation
    lp = np.asarray(causal_logps(model, jnp.asarray(np.stack(rows), jnp.int32)))
    return {key: lp[i, a:b].sum(dtype=np.float64) for i, (key, (a, b)) in
            enumerate(zip(keys, spans))}


@st.composite
def few_groups(draw):
    return [draw(groups_st(gid=i)) for i in range(draw(st.integers(1, NG)))]


@settings(max_examples=10, deadline=None)
@given(groups=few_groups())
def test_layouts_give_the_same_response_logps(model, groups):
    expected = alone_logps(model, groups)
    for layout in ("padded", "packed", "share_prefix"):
        cfg = BatchConfig(layout, batch_size=NG, seq_len=SEQ_LEN[layout], max_responses=K,
                          node_slots=N, max_steps=M)
        batch = pack_groups(groups, cfg)
        logps = np.asarray(batch_logps(model, {k: jnp.asarray(v) for k, v in batch.items()}))
        got = {(int(batch["group_id"][g]), k): logps[g, k]
               for g, k in zip(*np.nonzero(batch["response_mask"]))}
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{layout} {key}")


def random_group(rng, gid):
    """A pair, list, tree or unpaired group as :func:`groups_st` draws them (numpy rng)."""
    kind = ["pair", "list", "tree", "unpaired"][gid % 4]
    if kind == "tree":
        parents, depth = [-1], [0]
        for i in range(1, int(rng.integers(2, 8))):
            p = int(rng.choice([v for v in range(i) if depth[v] < M]))
            parents.append(p)
            depth.append(depth[p] + 1)
    else:
        k = {"pair": 2, "unpaired": 1}.get(kind) or int(rng.integers(2, 5))
        parents = [-1] + [0] * k
    tokens = [rng.integers(1, 100, rng.integers(1, 5)).tolist() for _ in parents]
    return make_group(gid, kind, tokens, parents)


@functools.cache
def logps_fn(num_nodes):
    @nnx.jit
    def fn(model, b):
        hidden = model.hidden(b["tokens"], b["positions"], b["segment"], b["node_pre"],
                              b["node_last"])  # [R, S, D]
        lp = token_logps(hidden, model.unembedding(), b["tokens"], b["pred_index"], chunk_size=8)
        return response_logps(lp, b["node_slot"], b["pred_index"], b["response_nodes"],
                              num_nodes).logps

    return fn


@pytest.mark.parametrize("layout", ["packed", "share_prefix"])
def test_rows_sized_from_the_data_give_the_same_response_logps(model, layout):
    rng = np.random.default_rng(0)
    groups = [random_group(rng, i) for i in range(12)]
    base = DataConfig(layout=layout, max_length=ALONE, batch_size=NG, max_responses=K,
                      max_steps=M)
    cfg = resolve_batch_shapes(base, groups, None)
    assert cfg.rows < NG  # several groups share a row
    expected = alone_logps(model, groups)
    got = {}
    for batch in make_eval_iterator(groups, None, cfg):
        logps = np.asarray(logps_fn(cfg.node_slots)(model, {k: jnp.asarray(v)
                                                            for k, v in batch.items()}))
        got.update({(int(batch["group_id"][g]), k): logps[g, k]
                    for g, k in zip(*np.nonzero(batch["response_mask"]))})
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-5,
                                   err_msg=f"{layout} {key}")
