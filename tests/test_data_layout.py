"""Batch layouts: literal cases checked by hand, and random pairs/lists/trees (hypothesis).

The checks read the batch arrays only through their definitions (docs/architecture.md §2):
responses are rebuilt by following ``pred_index`` from each response node up to the prompt, and
visibility is evaluated with the attention rule, independently of how the batcher fills rows.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpo.config import LAYOUTS
from jaxpo.data.batcher import BatchConfig, pack_groups
from jaxpo.data.layout import group_units
from jaxpo.data.types import TokenizedGroup


def make_group(gid, kind, node_tokens, node_parent, scores=None, ref=None):
    """A TokenizedGroup whose responses are the root-to-leaf paths, leaves in index order."""
    n = len(node_tokens)
    has_child = {p for p in node_parent if p >= 0}
    responses = []
    for leaf in (v for v in range(1, n) if v not in has_child):
        path = [leaf]
        while node_parent[path[-1]] != 0:
            path.append(node_parent[path[-1]])
        responses.append(path[::-1])
    K = len(responses)
    scores = np.arange(K, 0, -1, dtype=np.float32) if scores is None else scores
    return TokenizedGroup(gid, kind, [np.asarray(t, np.int32) for t in node_tokens],
                          list(node_parent), responses, np.asarray(scores, np.float32), ref)


@st.composite
def groups_st(draw, gid=0, max_steps=3):
    """A random pair, list or tree (depth <= max_steps below the prompt)."""
    kind = draw(st.sampled_from(["pair", "list", "tree", "unpaired"]))
    tok = st.lists(st.integers(1, 99), min_size=1, max_size=4)
    if kind == "tree":
        parents, depth = [-1], [0]
        for i in range(1, draw(st.integers(2, 7))):
            choices = [v for v in range(i) if depth[v] < max_steps]
            p = draw(st.sampled_from(choices))
            parents.append(p)
            depth.append(depth[p] + 1)
    else:
        k = {"pair": 2, "unpaired": 1}.get(kind) or draw(st.integers(2, 4))
        parents = [-1] + [0] * k
    node_tokens = [draw(tok) for _ in parents]
    return make_group(gid, kind, node_tokens, parents)


@st.composite
def group_lists_st(draw):
    n = draw(st.integers(1, 4))
    return [draw(groups_st(gid=100 + i)) for i in range(n)]


def config_for(groups, layout, one_row):
    """A config with room for all groups (in one row, or one group per row)."""
    K = max(g.num_responses for g in groups)
    units = [u for g in groups for u in group_units(g, layout)]
    lengths, nodes = [u.num_tokens for u in units], [u.num_nodes for u in units]
    if one_row and layout != "padded":
        S, N, rows = sum(lengths) + 1, max(sum(nodes), 4), 1
    else:
        S, N, rows = max(lengths) + 2, max(max(nodes), 4), None
    return BatchConfig(layout, batch_size=len(groups) + 1, seq_len=S, max_responses=K + 1,
                       node_slots=N, max_steps=3, rows=rows)


def node_spans(batch, N):
    """flat node id → row positions of its tokens."""
    spans = {}
    real = batch["segment"] != 0
    for r, q in zip(*np.nonzero(real)):
        spans.setdefault(int(r * N + batch["node_slot"][r, q]), []).append(int(q))
    return spans


def rebuild_responses(batch, N):
    """{(group_id, k): (prompt tokens, response tokens, score)} rebuilt via pred_index."""
    spans = node_spans(batch, N)
    out = {}
    for g, k in zip(*np.nonzero(batch["response_mask"])):
        path = [int(v) for v in batch["response_nodes"][g, k] if v >= 0]
        row = path[0] // N
        assert all(v // N == row for v in path)
        response = np.concatenate([batch["tokens"][row, spans[v]] for v in path])
        # Follow pred_index from the first response token up to the unscored prompt.
        q = spans[path[0]][0]
        for v in path[1:]:  # each step's first token is predicted by the previous step's last
            assert batch["pred_index"][row, spans[v][0]] == spans[path[path.index(v) - 1]][-1]
        p = int(batch["pred_index"][row, q])
        assert p >= 0
        root = row * N + int(batch["node_slot"][row, p])
        assert np.all(batch["pred_index"][row, spans[root]] == -1)
        assert spans[root][-1] == p
        prompt = batch["tokens"][row, spans[root]]
        key = (int(batch["group_id"][g]), int(k))
        out[key] = (prompt.tolist(), response.tolist(), float(batch["scores"][g, k]))
    return out


def expected_responses(groups):
    return {(g.id, k): (g.node_tokens[0].tolist(), g.response_tokens(k).tolist(),
                        float(g.scores[k])) for g in groups for k in range(g.num_responses)}


def check_definitions(batch, N):
    """positions, pred_index, node_pre/node_last/node_slot and visibility, from definitions."""
    R, _S = batch["tokens"].shape
    spans = node_spans(batch, N)
    real = batch["segment"] != 0
    np.testing.assert_array_equal(batch["node_slot"][real], batch["node_pre"][real])
    assert np.all(batch["pred_index"][~real] == -1) and np.all(batch["node_slot"][~real] == 0)
    for r in range(R):
        qs = np.nonzero(real[r])[0]
        if not len(qs):
            continue
        pre = batch["node_pre"][r, qs]
        # Preorder numbers count nodes in order of appearance: each new node is the next number.
        starts = np.r_[True, np.diff(pre) != 0]
        np.testing.assert_array_equal(pre[starts], np.arange(starts.sum()))
        for q in qs:
            p = batch["pred_index"][r, q]
            if p >= 0:  # depth: one more than the predicting token
                assert batch["positions"][r, q] == batch["positions"][r, p] + 1
                assert p < q and batch["segment"][r, p] == batch["segment"][r, q]
                if batch["node_pre"][r, p] == batch["node_pre"][r, q]:  # inside a node: q - 1
                    assert p == q - 1
                else:  # a node's first token: the parent's last token
                    assert batch["node_pre"][r, q - 1] != batch["node_pre"][r, q]
                    assert batch["node_pre"][r, p + 1] != batch["node_pre"][r, p]
                    assert batch["node_pre"][r, p] < batch["node_pre"][r, q] \
                        <= batch["node_last"][r, p]
            # Visibility rule vs the ancestor chain rebuilt from pred_index.
            visible = [k for k in qs if batch["segment"][r, k] == batch["segment"][r, q]
                       and k <= q and batch["node_pre"][r, k] <= batch["node_pre"][r, q]
                       <= batch["node_last"][r, k]]
            chain, slot = [], int(batch["node_slot"][r, q])
            while True:
                node = [k for k in spans[r * N + slot] if k <= q]
                chain = node + chain
                p = batch["pred_index"][r, spans[r * N + slot][0]]
                if p < 0:
                    break
                slot = int(batch["node_slot"][r, p])
            assert visible == chain, (r, q)
            # A token sees exactly the positions it would see alone: 0, 1, ..., depth.
            np.testing.assert_array_equal(batch["positions"][r, visible], np.arange(len(chain)))


def test_one_pair_share_prefix_by_hand():
    g = make_group(7, "pair", [[11, 12, 13], [21, 22], [31]], [-1, 0, 0], scores=[1, 0])
    cfg = BatchConfig("share_prefix", batch_size=1, seq_len=8, max_responses=2, node_slots=4)
    b = pack_groups([g], cfg)
    assert sorted(b) == sorted(["tokens", "positions", "segment", "node_pre", "node_last",
                                "pred_index", "node_slot", "response_nodes", "scores",
                                "response_mask", "group_mask", "group_id", "margin"])
    np.testing.assert_array_equal(b["tokens"], [[11, 12, 13, 21, 22, 31, 0, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 4, 3, 0, 0]])
    np.testing.assert_array_equal(b["segment"], [[1, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["node_pre"], [[0, 0, 0, 1, 1, 2, 0, 0]])
    np.testing.assert_array_equal(b["node_last"], [[2, 2, 2, 1, 1, 2, 0, 0]])
    np.testing.assert_array_equal(b["pred_index"], [[-1, -1, -1, 2, 3, 2, -1, -1]])
    np.testing.assert_array_equal(b["node_slot"], [[0, 0, 0, 1, 1, 2, 0, 0]])
    np.testing.assert_array_equal(b["response_nodes"], [[[1], [2]]])
    np.testing.assert_array_equal(b["scores"], [[1.0, 0.0]])
    np.testing.assert_array_equal(b["response_mask"], [[True, True]])
    np.testing.assert_array_equal(b["group_mask"], [True])
    np.testing.assert_array_equal(b["group_id"], [7])
    assert b["tokens"].dtype == np.int32 and b["scores"].dtype == np.float32


def test_one_pair_padded_and_packed_by_hand():
    g = make_group(3, "pair", [[11, 12, 13], [21, 22], [31]], [-1, 0, 0], scores=[1, 0])
    pad = pack_groups([g], BatchConfig("padded", batch_size=1, seq_len=6, max_responses=2,
                                       node_slots=4))
    np.testing.assert_array_equal(pad["tokens"], [[11, 12, 13, 21, 22, 0], [11, 12, 13, 31, 0, 0]])
    np.testing.assert_array_equal(pad["positions"], [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(pad["pred_index"], [[-1, -1, -1, 2, 3, -1],
                                                      [-1, -1, -1, 2, -1, -1]])
    np.testing.assert_array_equal(pad["node_last"], [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(pad["response_nodes"], [[[1], [4 + 1]]])  # row 1 * N + slot 1
    packed = pack_groups([g], BatchConfig("packed", batch_size=1, seq_len=10, max_responses=2,
                                          node_slots=4))
    np.testing.assert_array_equal(packed["tokens"], [[11, 12, 13, 21, 22, 11, 12, 13, 31, 0]])
    np.testing.assert_array_equal(packed["positions"], [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0]])
    np.testing.assert_array_equal(packed["segment"], [[1] * 9 + [0]])
    np.testing.assert_array_equal(packed["node_pre"], [[0, 0, 0, 1, 1, 2, 2, 2, 3, 0]])
    np.testing.assert_array_equal(packed["node_last"], [[1, 1, 1, 1, 1, 3, 3, 3, 3, 0]])
    np.testing.assert_array_equal(packed["pred_index"], [[-1, -1, -1, 2, 3, -1, -1, -1, 7, -1]])
    np.testing.assert_array_equal(packed["response_nodes"], [[[1], [3]]])


def test_tree_share_prefix_shares_steps_and_row_offset():
    # prompt → s1 → {a, b}; prompt → c.  Responses: s1·a, s1·b, c.
    g = make_group(0, "tree", [[1, 2], [3], [4, 5], [6], [7]], [-1, 0, 1, 1, 0])
    cfg = BatchConfig("share_prefix", batch_size=2, seq_len=8, max_responses=3, node_slots=5,
                      max_steps=2, rows=1)
    b = pack_groups([g], cfg, row_offset=3)
    np.testing.assert_array_equal(b["tokens"], [[1, 2, 3, 4, 5, 6, 7, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 4, 3, 2, 0]])
    np.testing.assert_array_equal(b["pred_index"], [[-1, -1, 1, 2, 3, 2, 1, -1]])
    np.testing.assert_array_equal(b["node_last"], [[4, 4, 3, 2, 2, 3, 4, 0]])
    np.testing.assert_array_equal(b["response_nodes"][0], [[16, 17], [16, 18], [19, -1]])
    np.testing.assert_array_equal(b["group_mask"], [True, False])
    np.testing.assert_array_equal(b["group_id"], [0, -1])


def test_errors_name_the_group():
    g = make_group(5, "list", [[1], [2], [3], [4]], [-1, 0, 0, 0])
    with pytest.raises(ValueError, match="group 5: 3 responses > max_responses=2"):
        pack_groups([g], BatchConfig("packed", batch_size=1, seq_len=20, max_responses=2,
                                     node_slots=8))
    with pytest.raises(ValueError, match="group 5: longer than a row"):
        pack_groups([g], BatchConfig("packed", batch_size=1, seq_len=5, max_responses=3,
                                     node_slots=8))
    bad = make_group(6, "pair", [[1], [], [3]], [-1, 0, 0])
    with pytest.raises(ValueError, match="group 6 .*node 1 has no tokens"):
        pack_groups([bad], BatchConfig("padded", batch_size=1, seq_len=5, max_responses=2,
                                       node_slots=2))


@settings(max_examples=100, deadline=None)
@given(groups=group_lists_st(), one_row=st.booleans())
def test_layouts_agree_and_obey_definitions(groups, one_row):
    expected = expected_responses(groups)
    for layout in LAYOUTS:
        cfg = config_for(groups, layout, one_row)
        batch = pack_groups(groups, cfg)
        assert rebuild_responses(batch, cfg.node_slots) == expected, layout
        check_definitions(batch, cfg.node_slots)
        assert batch["group_mask"].sum() == len(groups)
        assert batch["response_mask"].sum() == len(expected)
        if layout == "share_prefix":  # every node of every group appears exactly once
            assert (batch["segment"] != 0).sum() == sum(sum(map(len, g.node_tokens))
                                                       for g in groups)
