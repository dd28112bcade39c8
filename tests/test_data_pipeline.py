"""The grain pipeline: determinism, resumable state, epochs, counters, multi-host slices."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import signal

import numpy as np
import pytest
from test_data_layout import expected_responses, make_group, rebuild_responses

from jaxpo.config import DataConfig
from jaxpo.data.errors import BadRecordError
from jaxpo.data.groups import GroupBuilder
from jaxpo.data.pipeline import make_eval_iterator, make_train_iterator
from jaxpo.data.sources import RecordSource
from jaxpo.data.tokenize import Tokenizer
from jaxpo.data.types import TokenizedGroup

SHAPES = {  # layout → (batch_size, seq_len, rows); rows 0 = derived
    "padded": {"batch_size": 4, "seq_len": 16, "rows": 0},
    "packed": {"batch_size": 4, "seq_len": 32, "rows": 2},
    "share_prefix": {"batch_size": 4, "seq_len": 20, "rows": 2},
}


def make_records(n, seed=0, bad=(), too_long=()):
    """Raw records: pairs and lists of token ids (a stand-in for parsed JSON)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        k = 2 if i % 3 else 3
        plen = 30 if i in too_long else int(rng.integers(1, 4))
        records.append({"id": i, "prompt": rng.integers(1, 99, plen).tolist(),
                        "responses": [rng.integers(1, 99, rng.integers(1, 4)).tolist()
                                      for _ in range(k)], "bad": i in bad})
    return records


def build(record) -> TokenizedGroup | None:
    if record["bad"]:
        return None
    node_tokens = [record["prompt"]] + record["responses"]
    return make_group(record["id"], "list", node_tokens, [-1] + [0] * len(record["responses"]))


def data_config(layout, **kwargs):
    return DataConfig(**{"layout": layout, "max_responses": 3, "node_slots": 8,
                         **SHAPES[layout], **kwargs})


def iterator(records, layout, seed=1, num_epochs=None, **kwargs):
    return make_train_iterator(records, build, data_config(layout, **kwargs), seed=seed,
                               num_epochs=num_epochs)


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def take(it, n):
    return [next(it) for _ in range(n)]


def ids_of(batches):
    return [int(i) for b in batches for i in b["group_id"][b["group_mask"]]]


def test_same_seed_same_batches_other_seed_other_order():
    records = make_records(40)
    a = take(iterator(records, "share_prefix"), 6)
    assert_batches_equal(a, take(iterator(records, "share_prefix"), 6))
    c = take(iterator(records, "share_prefix", seed=2), 6)
    assert ids_of(a) != ids_of(c)


@pytest.mark.parametrize("layout", ["padded", "packed", "share_prefix"])
def test_restore_continues_exactly_across_epochs(layout):
    records = make_records(23, bad={4}, too_long={7})
    full = list(iterator(records, layout, num_epochs=3))
    for k in (3, len(full) // 3 + 1):  # mid-epoch, and past the first epoch boundary
        it = iterator(records, layout, num_epochs=3)
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))
        resumed = iterator(records, layout, num_epochs=3)
        resumed.set_state(state)
        assert_batches_equal(list(resumed), full[k:])
        assert resumed.counters == iterator_counters(records, layout)


def iterator_counters(records, layout):
    it = iterator(records, layout, num_epochs=3)
    for _ in it:
        pass
    return it.counters


@pytest.mark.parametrize("layout", ["padded", "packed", "share_prefix"])
def test_epochs_cover_every_group_once_each_reshuffled(layout):
    records = make_records(30, bad={3, 11}, too_long={5})
    it = iterator(records, layout, num_epochs=2)
    batches = list(it)
    ids = ids_of(batches)
    keep = [i for i in range(30) if i not in (3, 11, 5)]
    assert collections.Counter(ids) == collections.Counter(keep * 2)
    first_seen = list(dict.fromkeys(ids))
    second = [i for n, i in enumerate(ids) if i in ids[:n]]
    assert first_seen != second  # each epoch is shuffled differently
    assert it.counters == {"records_read": 60, "records_skipped": 4,
                           "groups_dropped_too_long": 2, "groups_packed": 54,
                           "batches": len(batches), "epoch": 1}
    for b in batches:
        S = SHAPES[layout]["seq_len"]
        assert b["tokens"].shape == (b["tokens"].shape[0], S)
        assert b["response_nodes"].shape == (4, 3, 1) and b["scores"].shape == (4, 3)
        got = rebuild_responses(b, 8)
        groups = [build(records[i]) for i in b["group_id"][b["group_mask"]]]
        assert got == expected_responses(groups)
    # Batches close early only when the rows are full or the data ends.
    assert all(b["group_mask"].all() for b in batches[:-1]) or layout != "padded"


def test_eval_is_one_ordered_pass_padded_at_the_end():
    records = make_records(10)
    cfg = DataConfig(layout="padded", batch_size=4, seq_len=16, max_responses=3, node_slots=4)
    batches = list(make_eval_iterator(records, build, cfg))
    assert len(batches) == 3
    assert ids_of(batches) == list(range(10))
    np.testing.assert_array_equal(batches[-1]["group_mask"], [True, True, False, False])
    np.testing.assert_array_equal(batches[-1]["group_id"], [8, 9, -1, -1])
    assert not batches[-1]["response_mask"][2:].any()
    assert (batches[-1]["segment"][2 * 3:] == 0).all()  # rows of empty groups are padding


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_state():
    records = make_records(20)
    base = list(iterator(records, "share_prefix", num_epochs=1, rows=1))
    it = iterator(records, "share_prefix", num_epochs=1, rows=1, num_workers=2)
    head = take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    assert state["pending"]  # the window is re-read by index on restore
    it.close()
    assert_batches_equal(head, base[:2])
    resumed = iterator(records, "share_prefix", num_epochs=1, rows=1, num_workers=2)
    resumed.set_state(state)
    assert_batches_equal(list(resumed), base[2:])
    resumed.close()


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")


@pytest.mark.parametrize("name", ["pairs_explicit", "pairs_implicit", "pairs_conversational",
                                  "lists", "trees", "trees_flat", "unpaired"])
def test_fixture_files_batch_in_every_layout(name):
    cfg = DataConfig(batch_size=2, max_responses=4, max_steps=3, node_slots=16)
    builder = GroupBuilder(Tokenizer.from_dir(os.path.join(FIXTURES, "tokenizer_llama3")), cfg)
    for ext in ("jsonl", "parquet"):
        source = RecordSource(os.path.join(FIXTURES, f"{name}.{ext}"))
        groups = [builder(source[i]) for i in range(len(source))]
        for layout, seq_len in (("padded", 128), ("packed", 256), ("share_prefix", 128)):
            layout_cfg = dataclasses.replace(cfg, layout=layout, seq_len=seq_len)
            it = make_eval_iterator(source, builder, layout_cfg)
            got = {}
            for batch in it:
                got.update(rebuild_responses(batch, 16))
            assert got == expected_responses(groups), (name, ext, layout)
            assert it.counters["groups"] == len(source) == it.counters["groups_packed"]


def test_builder_skip_counts_reach_the_iterator_state(tmp_path):
    path = tmp_path / "lists.jsonl"
    rows = [{"prompt": "Hi.", "responses": [" A.", " B."], "scores": [1.0, 0.0]},
            {"prompt": "Hi.", "responses": [" A.", " B."], "scores": [1.0, float("nan")]},
            {"prompt": "Yo.", "responses": [" C.", " D."], "scores": [0.0, 2.0]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig(layout="share_prefix", batch_size=2, seq_len=64, max_responses=2,
                     node_slots=4, on_bad_record="skip")
    builder = GroupBuilder(Tokenizer.from_dir(os.path.join(FIXTURES, "tokenizer_llama3")), cfg)
    it = make_train_iterator(RecordSource(str(path)), builder, cfg, num_epochs=1)
    batches = list(it)
    assert sorted(ids_of(batches)) == [0, 2]
    state = json.loads(json.dumps(it.get_state()))
    skipped = {k: v for k, v in state["counters"].items() if k.startswith("skipped/")}
    assert sum(skipped.values()) == 1 and it.counters["records_skipped"] == 1


@contextlib.contextmanager
def within(seconds):
    """Fails the test instead of hanging (the bug made the iterator read forever)."""

    def alarm(*_):
        raise TimeoutError(f"still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


LLAMA3 = os.path.join(FIXTURES, "tokenizer_llama3")


@pytest.mark.parametrize("rows, overrides, reasons", [
    ([{"prompt": "One two three four five six.", "chosen": " A.", "rejected": " B."}] * 3,
     {"max_length": 4}, "dropped/prompt_too_long: 3"),
    ([{"prompt": "Hi.", "responses": [" A.", " B."], "scores": [1.0, 1.0]}] * 3,
     {"on_bad_record": "skip"}, "skipped/no_preference: 3"),
    ([{"prompt": "Hi.", "chosen": " A.", "rejected": " B."}] * 3,
     {"seq_len": 4}, "longer than a row (seq_len=4, node_slots=6): 3"),
])
def test_no_usable_records_is_an_error_not_an_endless_loop(tmp_path, rows, overrides, reasons):
    path = write_rows(tmp_path / "unusable.jsonl", rows)
    cfg = DataConfig(batch_size=2, **overrides)
    builder = GroupBuilder(Tokenizer.from_dir(LLAMA3), cfg)
    want = f"no usable records in {path}: 3 read, 3 skipped ({reasons})"
    with within(60):
        with pytest.raises(ValueError) as e:
            next(make_train_iterator(RecordSource(path), builder, cfg))
        assert str(e.value) == want
        with pytest.raises(ValueError, match=re.escape(want)):
            next(make_eval_iterator(RecordSource(path), builder, cfg))


def test_no_usable_records_from_a_plain_builder():
    records = make_records(6, bad=set(range(6)))
    with within(60), pytest.raises(ValueError, match=re.escape(
            "no usable records in the records given: 6 read, 6 skipped (builder returned None: "
            "6)")):
        next(make_train_iterator(records, build, data_config("packed")))
    with pytest.raises(ValueError, match=r"no records in the records given"):
        make_train_iterator([], build, data_config("packed"))


def test_some_usable_records_keep_the_iterator_going():
    records = make_records(12, bad=set(range(11)))  # one good record in twelve
    batches = take(iterator(records, "share_prefix"), 3)  # repeats forever, never raises
    assert ids_of(batches) == [11] * 12  # one group per epoch; 4 group slots per batch


def test_label_mapping_reaches_the_batch_scores(tmp_path):
    path = write_rows(tmp_path / "lists.jsonl", [
        {"prompt": "Hi.", "responses": [" A.", " B.", " C."], "scores": [3.0, 7.0, 5.0]}])
    tok = Tokenizer.from_dir(LLAMA3)
    for cfg, objective, want in [
        (DataConfig(max_responses=3), None, [0.0, 1.0, 0.5]),
        (DataConfig(max_responses=3, label_mapping="raw"), None, [3.0, 7.0, 5.0]),
        (DataConfig(max_responses=3), "raw", [3.0, 7.0, 5.0]),  # e.g. pro, infonca
    ]:
        batch = next(make_eval_iterator(RecordSource(path), GroupBuilder(tok, cfg,
                                        label_mapping=objective), cfg))
        np.testing.assert_allclose(batch["scores"][0], want)


def test_records_over_max_record_bytes_are_skipped_and_counted(tmp_path):
    path = write_rows(tmp_path / "big.jsonl", [
        {"prompt": "Hi.", "chosen": " A.", "rejected": " B."},
        {"prompt": "Hi." * 500, "chosen": " A.", "rejected": " B."},
        {"prompt": "Yo.", "chosen": " C.", "rejected": " D."}])
    tok = Tokenizer.from_dir(LLAMA3)
    source = RecordSource(path, max_record_bytes=1000)
    cfg = DataConfig(batch_size=2)
    with pytest.raises(BadRecordError, match=rf"{path}:2: field '<record>': record is \d+ bytes"):
        list(make_eval_iterator(source, GroupBuilder(tok, cfg), cfg))
    cfg = DataConfig(batch_size=2, on_bad_record="skip")
    it = make_eval_iterator(source, GroupBuilder(tok, cfg), cfg)
    assert sorted(ids_of(list(it))) == [0, 2]
    assert it.counters["skipped/too_large"] == 1 and it.counters["records_skipped"] == 1
