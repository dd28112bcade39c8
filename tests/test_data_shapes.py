"""Rows sized from a token budget: the derivation of R and N, and that no group is lost."""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import numpy as np
import pytest
from test_data_layout import check_definitions, expected_responses, make_group, rebuild_responses

from jaxpo.config import DataConfig
from jaxpo.data import (
    BatchConfig,
    make_eval_iterator,
    make_train_iterator,
    node_slots,
    num_rows,
    plan_batch_shapes,
    resolve_batch_shapes,
    row_length,
)
from jaxpo.data.errors import BadRecordError
from jaxpo.data.groups import GroupBuilder
from jaxpo.data.shapes import FULL_TARGET, simulate_packing
from jaxpo.data.sources import RecordSource
from jaxpo.data.tokenize import Tokenizer


def pairs(n, seed=0, prompt=(50, 90), response=(10, 30), start=0):
    """Pair groups of random lengths (token ids 1..99)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        nodes = [rng.integers(1, 99, rng.integers(*prompt))]
        nodes += [rng.integers(1, 99, rng.integers(*response)) for _ in range(2)]
        out.append(make_group(i, "pair", nodes, [-1, 0, 0], scores=[1, 0]))
    return out


def trees(n, seed=0):
    """Lists of 2–4 and two-level trees of short nodes, K <= 4, M <= 2."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2:
            parents = [-1] + [0] * int(rng.integers(2, 5))
        else:
            parents = [-1, 0, 1, 1, 0]
        nodes = [rng.integers(1, 99, rng.integers(1, 9)) for _ in parents]
        out.append(make_group(i, "tree" if i % 2 == 0 else "list", nodes, parents))
    return out


CFG = DataConfig(max_length=256, batch_size=8)  # share_prefix, K = 2: S = 511


# The derivation from the config alone ---------------------------------------------------------

def test_a_token_budget_gives_rows_and_node_slots():
    cfg = dataclasses.replace(CFG, tokens_per_batch=1200)
    assert row_length(cfg) == 511
    assert num_rows(cfg) == 3  # ceil(1200 / 511)
    assert num_rows(cfg, process_count=2) == 4  # each process packs R / P rows
    assert node_slots(cfg) == 3 * 6  # 3 nodes per pair, room for 2 * 8 / 3 pairs per row
    assert num_rows(dataclasses.replace(cfg, tokens_per_batch=10**6)) == 8  # at most NG
    packed = dataclasses.replace(cfg, layout="packed", tokens_per_batch=2048)  # S = 512
    assert (num_rows(packed), node_slots(packed)) == (4, 4 * 4)
    shapes = BatchConfig.from_data_config(cfg, process_count=2)
    assert (shapes.num_rows, shapes.batch_size, shapes.node_slots) == (2, 4, 18)


def test_without_a_budget_the_config_only_shapes_are_unchanged():
    assert num_rows(CFG) == 8 and node_slots(CFG) == 6  # one group per row, two fit its nodes
    padded = dataclasses.replace(CFG, layout="padded", tokens_per_batch=1000)
    assert (num_rows(padded), node_slots(padded)) == (16, 2)  # a row per response


def test_explicit_values_win():
    cfg = dataclasses.replace(CFG, tokens_per_batch=1200, rows=2)
    assert num_rows(cfg) == 2 and node_slots(cfg) == 3 * 8
    cfg = dataclasses.replace(cfg, node_slots=5)
    assert node_slots(cfg) == 5
    groups = pairs(40)
    resolved = resolve_batch_shapes(cfg, groups, None)
    assert (resolved.rows, resolved.node_slots, resolved.tokens_per_batch) == (2, 5, 2 * 511)
    only_nodes = resolve_batch_shapes(dataclasses.replace(CFG, node_slots=12), groups, None)
    assert only_nodes.node_slots == 12
    budget = resolve_batch_shapes(dataclasses.replace(CFG, tokens_per_batch=1200), groups, None,
                                  process_count=2)
    assert (budget.rows, budget.node_slots, budget.tokens_per_batch) == (4, 18, 4 * 511)
    assert budget.node_slots == node_slots(dataclasses.replace(CFG, tokens_per_batch=1200))
    with pytest.raises(ValueError, match="data.rows=3 is not divisible by process_count=2"):
        resolve_batch_shapes(dataclasses.replace(CFG, rows=3), groups, None, process_count=2)
    with pytest.raises(ValueError, match="tokens_per_batch=-1 must be >= 0"):
        DataConfig(tokens_per_batch=-1)


# The derivation from a sample of the data -----------------------------------------------------

def test_derived_rows_hold_the_sample_and_are_fixed_for_it():
    groups = pairs(300)  # share_prefix groups of 70-150 tokens, mean ~110
    plan = plan_batch_shapes(CFG, groups, None)
    mean = np.mean([sum(map(len, g.node_tokens)) for g in groups])
    assert plan.records == 256 and plan.groups == 256
    assert abs(plan.mean_group_tokens - mean) < 5
    cfg = plan.config
    assert cfg.rows < CFG.batch_size  # far fewer rows than one per group
    assert cfg.rows * 511 >= CFG.batch_size * plan.mean_group_tokens
    assert cfg.tokens_per_batch == cfg.rows * 511 and cfg.node_slots == node_slots(cfg)
    assert plan.full_fraction >= FULL_TARGET
    if cfg.rows > 1:  # one row fewer would leave batches short
        fewer = dataclasses.replace(CFG, rows=cfg.rows - 1)
        assert plan_batch_shapes(fewer, groups, None).full_fraction < FULL_TARGET
    # The same sample gives the same shapes; records outside the sample, and a few changed
    # lengths, do not change them.
    assert resolve_batch_shapes(CFG, groups, None) == cfg
    more = groups + pairs(100, seed=5, start=300)
    assert resolve_batch_shapes(CFG, more, None).rows == cfg.rows
    edited = list(groups)
    for i in range(0, 300, 30):
        edited[i] = pairs(1, seed=100 + i, start=i)[0]
    assert resolve_batch_shapes(CFG, edited, None) == cfg


def test_rows_are_multiples_of_the_processes_and_the_row_multiple():
    groups = pairs(100)
    for p, multiple in [(2, 1), (4, 1), (1, 3), (2, 4)]:
        cfg = resolve_batch_shapes(CFG, groups, None, process_count=p, row_multiple=multiple)
        assert cfg.rows % p == 0 and cfg.rows % multiple == 0
        BatchConfig.from_data_config(cfg, process_count=p)


@pytest.mark.parametrize("layout", ["packed", "share_prefix"])
def test_long_groups_get_a_row_each(layout):
    # Groups over half a row: only one fits a row, so a batch needs NG rows (as before).
    groups = pairs(50, prompt=(180, 200), response=(40, 55))
    cfg = resolve_batch_shapes(dataclasses.replace(CFG, layout=layout), groups, None)
    assert cfg.rows == CFG.batch_size


def test_padded_and_unusable_data_keep_the_config_only_shapes():
    padded = resolve_batch_shapes(dataclasses.replace(CFG, layout="padded"), pairs(20), None)
    assert (padded.rows, padded.node_slots) == (16, 2)
    nothing = resolve_batch_shapes(CFG, [None] * 5, lambda record: None)
    assert (nothing.rows, nothing.node_slots) == (8, 6)


def test_the_builders_counters_are_not_touched():
    class Builder:
        calls = 0

        def __call__(self, record):
            raise AssertionError("the sample must use build(), which returns the counts")

        def build(self, record):
            Builder.calls += 1
            return type("Result", (), {"group": record, "counts": {"groups": 1}})()

    resolve_batch_shapes(CFG, pairs(10), Builder())
    assert Builder.calls == 10


def test_simulated_packing_matches_the_iterator():
    groups = pairs(200, seed=3)
    cfg = dataclasses.replace(CFG, rows=2, node_slots=16, shuffle=False)
    batches = list(make_train_iterator(groups, None, cfg, num_epochs=1))
    got = [int(b["group_mask"].sum()) for b in batches]
    sizes = [(sum(map(len, g.node_tokens)), 3) for g in groups]
    want = simulate_packing(iter(sizes), 8, 2, 511, 16, window=16)
    assert got[:len(want)] == want


# Batches built with the derived shapes -------------------------------------------------------

def ids_of(batches):
    return [int(i) for b in batches for i in b["group_id"][b["group_mask"]]]


@pytest.mark.parametrize("layout", ["packed", "share_prefix"])
@pytest.mark.parametrize("kind", ["pairs", "trees"])
def test_every_group_is_in_exactly_one_batch(layout, kind):
    if kind == "pairs":
        groups = pairs(60, seed=1) + pairs(4, seed=2, prompt=(200, 201), response=(55, 56),
                                           start=60)  # as long as max_length allows
        base = dataclasses.replace(CFG, layout=layout, batch_size=4)
    else:
        groups = trees(60, seed=1)
        base = DataConfig(layout=layout, max_length=24, batch_size=4, max_responses=4,
                          max_steps=2)
    cfg = resolve_batch_shapes(base, groups, None)
    assert cfg.rows < base.batch_size
    for it in (make_train_iterator(groups, None, cfg, num_epochs=1, seed=3),
               make_eval_iterator(groups, None, cfg)):
        batches = list(it)
        assert collections.Counter(ids_of(batches)) == collections.Counter(range(len(groups)))
        assert it.counters["groups_dropped_too_long"] == 0
        assert it.counters["groups_packed"] == len(groups)
        N = cfg.node_slots
        for b in batches:
            assert b["tokens"].shape == (cfg.rows, row_length(cfg))
            check_definitions(b, N)
            real = [groups[i] for i in b["group_id"][b["group_mask"]]]
            assert rebuild_responses(b, N) == expected_responses(real)


def test_a_batch_out_of_rows_carries_fewer_groups():
    # Two rows hold at most 2 * 511 tokens: 8 groups of ~150 never fit, so every batch closes
    # with fewer; the empty slots are masked and no group is lost.
    groups = pairs(40, prompt=(100, 110), response=(20, 25))
    cfg = dataclasses.replace(CFG, rows=2, shuffle=False)
    batches = list(make_train_iterator(groups, None, cfg, num_epochs=1))
    assert sorted(ids_of(batches)) == list(range(40))
    for b in batches:
        g = int(b["group_mask"].sum())
        assert g < 8
        np.testing.assert_array_equal(b["group_mask"], np.arange(8) < g)
        assert (b["group_id"][g:] == -1).all() and not b["response_mask"][g:].any()
        assert (b["response_nodes"][g:] == -1).all()


def test_a_bad_record_in_the_sample_is_left_to_the_iterator(tmp_path):
    rows = [{"prompt": "Hi there.", "chosen": " A.", "rejected": " B."}] * 9
    rows[4] = {"prompt": "Hi.", "chosen": " A.", "rejected": " A."}  # identical_responses
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer.from_dir(os.path.join(os.path.dirname(__file__), "fixtures", "data",
                                          "tokenizer_llama3"))
    cfg = DataConfig(max_length=32, batch_size=4)
    builder = GroupBuilder(tok, cfg)
    plan = plan_batch_shapes(cfg, RecordSource(str(path)), builder)
    assert (plan.records, plan.groups, plan.config.rows) == (9, 8, 1)
    assert builder.counters.as_metrics().get("data/groups", 0) == 0  # counters untouched
    with pytest.raises(BadRecordError, match="pairs.jsonl:5"):
        list(make_eval_iterator(RecordSource(str(path)), builder, plan.config))
