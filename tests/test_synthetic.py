"""The bundled synthetic task: true reward, record generators for every kind, tiny tokenizer."""

import json
import os

import pytest

from jaxpo.config import DataConfig
from jaxpo.data.groups import GroupBuilder
from jaxpo.data.records import parse_record
from jaxpo.data.tokenize import Tokenizer
from jaxpo.tasks import synthetic as syn


@pytest.mark.parametrize("response, reward", [
    (" a c d", 1.0),
    (" a c d</s>", 1.0),
    (" a c d </s> x y", 1.0),  # everything after EOS is ignored
    (" a d c", 1 / 3),
    (" a c d d", 3 / 4),  # the stutter
    (" a c", 2 / 3),
    ("", 0.0),
    (" d c a", 1 / 3),
])
def test_true_reward(response, reward):
    assert syn.true_reward("sort: d a c ->", response) == pytest.approx(reward)


def test_answer_and_bad_prompt():
    assert syn.answer("sort: j b e ->") == " b e j"
    with pytest.raises(ValueError, match="not a synthetic-task prompt"):
        syn.true_reward("count: 1 2 ->", " 1 2")


def test_pairs_prefer_the_higher_true_reward():
    rows = list(syn.records("pair", 300, seed=0))
    for r in rows:
        assert syn.true_reward(r["prompt"], r["chosen"]) > syn.true_reward(r["prompt"],
                                                                           r["rejected"])
        assert parse_record(r).kind == "pair"
    # The base policy's habit: most chosen responses stutter (repeat their last letter).
    stutters = sum(r["chosen"].split()[-1] == r["chosen"].split()[-2] for r in rows)
    assert 0.4 < stutters / len(rows) < 0.9


def test_lists_are_scored_by_the_true_reward():
    for r in syn.records("list", 50, seed=1):
        assert len(r["responses"]) == 4 == len(set(r["responses"]))
        assert r["scores"] == [pytest.approx(syn.true_reward(r["prompt"], x), abs=1e-4)
                               for x in r["responses"]]
        assert len(set(r["scores"])) > 1
        assert parse_record(r).kind == "list"


def _leaves(nodes, prefix=()):
    for node in nodes:
        path = prefix + (node["text"],)
        if node.get("children"):
            yield from _leaves(node["children"], path)
        else:
            yield "".join(path), node["score"]


def test_trees_share_steps_and_score_leaves():
    shared = merged = 0
    for r in syn.records("tree", 50, seed=2):
        leaves = list(_leaves(r["tree"]))
        assert len(leaves) == 4
        for text, score in leaves:
            assert score == pytest.approx(syn.true_reward(r["prompt"], text), abs=1e-4)
        shared += len(r["tree"]) < 4  # some first steps are shared
        rec = parse_record(r)
        assert rec.kind == "tree" and len(rec.tree.leaves) == 4
        assert len(rec.tree.texts) <= sum(len(t.split()) for t, _ in leaves)
        merged += len(rec.tree.texts) < sum(len(t.split()) for t, _ in leaves)
    assert shared > 0 and merged > 0


def test_unpaired_labels():
    rows = list(syn.records("unpaired", 200, seed=3))
    for r in rows:
        assert r["label"] == (syn.true_reward(r["prompt"], r["completion"]) == 1.0)
        assert parse_record(r).kind == "unpaired"
    assert 0.3 < sum(r["label"] for r in rows) / len(rows) < 0.7


def test_generation_is_deterministic_and_splits_differ(tmp_path):
    assert list(syn.records("pair", 5, seed=7)) == list(syn.records("pair", 5, seed=7))
    paths = syn.write_task(str(tmp_path), "list", num_train=20, num_eval=10, seed=0)
    with open(paths["train"]) as f:
        train = [json.loads(x) for x in f]
    with open(paths["eval"]) as f:
        held = [json.loads(x) for x in f]
    assert (len(train), len(held)) == (20, 10)
    assert train != held[: len(train)]
    with pytest.raises(ValueError, match="choose from"):
        list(syn.records("pairs", 1))


def test_bundled_tokenizer_is_the_generated_one():
    for name, text in syn.tokenizer_files().items():
        with open(os.path.join(syn.tokenizer_dir(), name), encoding="utf-8") as f:
            assert f.read() == text, ("regenerate the asset: python -c 'from jaxpo.tasks import "
                                      "synthetic as s; s.write_tokenizer(s.tokenizer_dir())'")


def test_tokenizer_one_token_per_word_with_bos_eos():
    tok = Tokenizer.from_dir(syn.tokenizer_dir())
    ids = tok.encode("sort: d a c -> a c d</s>")
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2
    assert len(ids) == 10 and tok.encode("a c", add_special_tokens=False) == ids[6:8]
    assert syn.UNK not in tok.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == "sort: d a c -> a c d"
    assert tok.vocab_size == len(syn.VOCAB)


def test_records_become_groups_of_each_kind():
    tok = Tokenizer.from_dir(syn.tokenizer_dir())
    cfg = DataConfig(max_length=64, max_prompt_length=16, max_responses=4, max_steps=5)
    builder = GroupBuilder(tok, cfg)
    for kind, k in (("pair", 2), ("list", 4), ("tree", 4), ("unpaired", 1)):
        record = next(syn.records(kind, 1, seed=5))
        group = builder(record)
        assert group is not None and group.kind == kind and group.num_responses == k
        assert tok.decode(group.node_tokens[0]) == "<s> " + record["prompt"]
        for path in group.responses:  # each response ends in EOS
            assert group.node_tokens[path[-1]][-1] == tok.eos_id
