"""Record detection, parsing, validation and label mapping (data.records, validate, labels)."""

import json
import math

import numpy as np
import pytest
import scipy.stats

from jaxpo.data import labels
from jaxpo.data.errors import BadRecordError, RecordCounters, Where
from jaxpo.data.records import detect_format, parse_record

W = Where("data/train.jsonl", 17, "line")


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# Detection and parsing -----------------------------------------------------------------------


@pytest.mark.parametrize("record,kind", [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "pair"),
    ({"chosen": "p a", "rejected": "p b"}, "pair"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}, "list"),
    ({"prompt": "p", "tree": {"text": "a", "score": 1}}, "tree"),
    ({"prompt": "p", "responses": [{"steps": ["a"], "score": 1}]}, "tree"),
    ({"prompt": "p", "completion": "a", "label": True}, "unpaired"),
])
def test_detect_format(record, kind):
    assert detect_format(record) == kind


def test_detect_format_unknown_names_the_fields():
    with pytest.raises(BadRecordError, match=r"data/train.jsonl:17: field '<record>'.*\['foo'\]"):
        detect_format({"foo": 1}, W)


def test_format_override_reports_missing_field():
    with pytest.raises(BadRecordError, match="field 'responses': missing") as e:
        parse_record({"prompt": "p", "chosen": "a", "rejected": "b"}, format="list", where=W)
    assert e.value.reason == "missing_field"


def test_explicit_pair():
    r = parse_record({"prompt": "p", "chosen": "a", "rejected": "b", "ref_chosen_logps": -1,
                      "ref_rejected_logps": -2.5}, record_id=7)
    assert (r.kind, r.id, r.prompt, r.responses, r.scores) == ("pair", 7, "p", ["a", "b"], [1, 0])
    assert r.ref_logps == [-1.0, -2.5] and not r.conversational


def test_implicit_string_prompt_moves_the_space_to_the_completions():
    r = parse_record({"chosen": "What color is the sky? It is blue.",
                      "rejected": "What color is the sky? It is green."})
    assert r.prompt == "What color is the sky? It is"  # character-level common prefix
    assert r.responses == [" blue.", " green."]


def test_implicit_conversational_prompt_is_the_common_message_prefix():
    common = msgs(("user", "hi"), ("assistant", "hello"), ("user", "joke?"))
    r = parse_record({"chosen": common + msgs(("assistant", "cats")),
                      "rejected": common + msgs(("assistant", "no"))})
    assert r.conversational and r.prompt == common
    assert r.responses == [msgs(("assistant", "cats")), msgs(("assistant", "no"))]


def test_conversational_pair_and_list():
    r = parse_record({"prompt": msgs(("user", "q")), "chosen": msgs(("assistant", "a")),
                      "rejected": msgs(("assistant", "b"))})
    assert r.conversational and r.responses[1] == msgs(("assistant", "b"))
    r = parse_record({"prompt": msgs(("user", "q")), "scores": [1, 2, 3],
                      "responses": [msgs(("assistant", t)) for t in "abc"]})
    assert r.kind == "list" and r.conversational and r.num_responses == 3


def test_list_with_ranks_and_variable_k():
    r = parse_record({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [2, 1, 3]},
                     max_responses=3)
    assert r.ranks == [2, 1, 3] and r.scores is None


def test_unpaired():
    r = parse_record({"prompt": "p", "completion": "a", "label": False})
    assert (r.kind, r.responses, r.scores) == ("unpaired", ["a"], [0.0])


def test_nested_tree_preorder_and_leaves():
    tree = {"text": "s1", "reward": 0.5, "children": [
        {"text": "s2", "children": [{"text": "s3", "score": 3}, {"text": "s4", "reward": 4}]},
        {"text": "s5", "score": 5, "children": []}]}
    r = parse_record({"prompt": "p", "tree": tree})
    t = r.tree
    assert t.texts == ["s1", "s2", "s3", "s4", "s5"]
    assert t.parents == [-1, 0, 1, 1, 0]
    assert t.leaves == [2, 3, 4] and r.scores == [3.0, 4.0, 5.0]
    assert t.rewards[0] == 0.5 and t.path(3) == [0, 1, 3]


def test_tree_root_without_text_is_the_prompt():
    r = parse_record({"prompt": "p", "tree": {"children": [{"text": "a", "score": 1},
                                                           {"text": "b", "score": 0}]}})
    assert r.tree.parents == [-1, -1] and r.tree.leaves == [0, 1]


def test_flat_tree_merges_identical_prefixes_and_keeps_response_order():
    r = parse_record({"prompt": "p", "responses": [
        {"steps": ["a", "b", "c"], "score": 1}, {"steps": ["x"], "score": 0.5},
        {"steps": ["a", "b", "d"], "score": 0}, {"steps": ["a", "e"], "score": 2}]})
    t = r.tree
    paths = [[t.texts[n] for n in t.path(leaf)] for leaf in t.leaves]
    assert paths == [["a", "b", "c"], ["x"], ["a", "b", "d"], ["a", "e"]]
    assert t.texts == ["a", "b", "c", "x", "d", "e"]  # a and b stored once
    assert t.parents == [-1, 0, 1, -1, 1, 0] and r.scores == [1.0, 0.5, 0.0, 2.0]


# Validation: every bad case names file, line and field, with its reason ------------------------

BAD = [
    ({"prompt": "p", "chosen": "a"}, "rejected", "missing_field"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen", "wrong_type"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "rejected", "identical_responses"),
    ({"prompt": msgs(("user", "q")), "chosen": "a", "rejected": msgs(("assistant", "b"))},
     "chosen", "wrong_type"),
    ({"prompt": [{"role": "user"}], "chosen": msgs(("assistant", "a")),
      "rejected": msgs(("assistant", "b"))}, "prompt[0].content", "missing_field"),
    ({"chosen": "abc", "rejected": "xyz"}, "prompt", "no_common_prompt"),
    ({"chosen": "abc", "rejected": "abcd"}, "prompt", "no_common_prompt"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "ref_chosen_logps": 1.0},
     "ref_rejected_logps", "missing_field"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1.0, float("nan")]}, "scores",
     "nan_score"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1.0, float("inf")]}, "scores",
     "nan_score"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1.0, "x"]}, "scores", "wrong_type"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1.0]}, "scores", "length_mismatch"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 1.0]}, "scores", "no_preference"),
    ({"prompt": "p", "responses": ["a", "b"]}, "scores", "missing_field"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 3]}, "ranks", "bad_rank"),
    ({"prompt": "p", "responses": ["a", "b", "a"], "scores": [1, 2, 3]}, "responses",
     "duplicate_responses"),
    ({"prompt": "p", "responses": ["a"], "scores": [1]}, "responses", "too_few_responses"),
    ({"prompt": "p", "responses": list("abcde"), "scores": [1, 2, 3, 4, 5]}, "responses",
     "too_many_responses"),
    ({"prompt": "p", "responses": ["a", ""], "scores": [1, 2]}, "responses[1]", "empty"),
    ({"prompt": "p", "completion": "a", "label": "yes"}, "label", "wrong_type"),
    ({"prompt": "p", "tree": {"text": "a", "children": []}}, "tree.score", "empty_children"),
    ({"prompt": "p", "tree": {"text": "a", "children": [{"text": "b", "score": 1},
                                                        {"text": "c"}]}},
     "tree.children[1].score", "leaf_without_score"),
    ({"prompt": "p", "tree": {"text": "a", "children": [
        {"text": "b", "score": 1}, {"text": "c", "score": float("nan")}]}},
     "tree.children[1].score", "nan_score"),
    ({"prompt": "p", "tree": {"text": "a", "children": [
        {"text": "b", "children": [{"text": "c", "children": [
            {"text": "d", "children": [{"text": "e", "score": 1}]}]}]},
        {"text": "x", "score": 0}]}}, "tree.children[0].children[0].children[0]",
     "tree_too_deep"),
    ({"prompt": "p", "tree": {"text": "a", "children": [{"text": "b", "score": 1},
                                                        {"text": "b", "score": 0}]}},
     "tree", "duplicate_responses"),
    ({"prompt": "p", "responses": [{"steps": ["a", "b"], "score": 1},
                                   {"steps": ["a"], "score": 0}]},
     "responses[1].steps", "duplicate_responses"),
    ({"prompt": "p", "responses": [{"steps": ["a", "b", "c", "d"], "score": 1},
                                   {"steps": ["a"], "score": 0}]},
     "responses[0].steps", "tree_too_deep"),
    ({"prompt": "p", "responses": [{"steps": ["a"], "score": 1}, {"steps": ["b"]}]},
     "responses[1].score", "leaf_without_score"),
    ({"prompt": "p", "tree": {"text": "a", "score": 1}}, "tree", "too_few_responses"),
    ({"prompt": "p"}, "<record>", "unknown_format"),
    (["not", "a", "dict"], "<record>", "wrong_type"),
]


@pytest.mark.parametrize("record,field,reason", BAD)
def test_bad_record_names_file_line_field_and_reason(record, field, reason):
    with pytest.raises(BadRecordError) as e:
        parse_record(record, where=W, max_responses=4, max_steps=3)
    assert e.value.reason == reason
    assert e.value.field == field
    assert str(e.value).startswith(f"data/train.jsonl:17: field '{field}': ")


def test_nan_message_matches_the_documented_form():
    with pytest.raises(BadRecordError) as e:
        parse_record({"prompt": "p", "responses": ["a", "b"], "scores": [1.0, math.nan]}, where=W)
    assert str(e.value) == "data/train.jsonl:17: field 'scores': NaN at index 1"


def test_row_locations_and_pickling():
    err = BadRecordError(Where("x.parquet", 3, "row"), "scores", "nan_score", "NaN")
    assert str(err) == "x.parquet:row 3: field 'scores': NaN"
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.reason) == (str(err), "nan_score")


def test_counters_total_and_metrics():
    c = RecordCounters()
    for key in ["skipped/nan_score", "skipped/empty", "skipped/empty", "groups"]:
        c.add(key)
    c.merge({"groups": 2})
    assert c.total("skipped") == 3 and c["groups"] == 3
    assert c.as_metrics()["data/skipped/empty"] == 2


# Labels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_win_rate_matches_average_ranks(k):
    rng = np.random.default_rng(k)
    s = rng.integers(0, 3, size=k).astype(float)  # with ties
    expected = (scipy.stats.rankdata(s, method="average") - 1) / (k - 1)
    np.testing.assert_allclose(labels.win_rate(s), expected, rtol=1e-6)


def test_distinct_ranks_map_to_k_minus_rank_over_k_minus_one():
    ranks = [3, 1, 4, 2]
    np.testing.assert_allclose(labels.ranks_to_psi(ranks), [(4 - r) / 3 for r in ranks],
                               rtol=1e-6)


def test_minmax_and_bradley_terry():
    s = np.array([2.0, -1.0, 0.5])
    np.testing.assert_allclose(labels.scores_to_psi(s), (s + 1) / 3, rtol=1e-6)
    bt = [np.mean([1 / (1 + math.exp(-(s[i] - s[j]))) for j in range(3) if j != i])
          for i in range(3)]
    np.testing.assert_allclose(labels.scores_to_psi(s, "bradley_terry"), bt, rtol=1e-6)
    np.testing.assert_array_equal(labels.scores_to_psi(s, "raw"), s.astype(np.float32))
    psi = labels.scores_to_psi(s, "winrate")
    assert psi.tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="label_mapping"):
        labels.scores_to_psi(s, "softmax")


def test_labels_are_in_unit_interval_and_order_preserving():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.normal(size=rng.integers(2, 9)) * 10
        for mapping in ("minmax", "winrate", "bradley_terry"):
            psi = labels.scores_to_psi(s, mapping)
            assert psi.min() >= 0 and psi.max() <= 1
            assert np.all(np.diff(psi[np.argsort(s)]) >= 0)


def test_fixture_files_parse():
    import os

    here = os.path.join(os.path.dirname(__file__), "fixtures", "data")
    kinds = {"pairs_explicit": "pair", "pairs_implicit": "pair", "pairs_conversational": "pair",
             "lists": "list", "trees": "tree", "trees_flat": "tree", "unpaired": "unpaired"}
    for name, kind in kinds.items():
        with open(os.path.join(here, f"{name}.jsonl")) as f:
            for i, line in enumerate(f):
                assert parse_record(json.loads(line), record_id=i).kind == kind
