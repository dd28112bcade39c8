"""The benchmark's task family: true rewards, base policies, records of every shape, tokenizer."""

import json
import os
import random

import pytest

from jaxpo.config import DataConfig
from jaxpo.data.groups import GroupBuilder
from jaxpo.data.records import parse_record
from jaxpo.data.tokenize import Tokenizer
from jaxpo.tasks import family, synthetic

ADD, RISE, SORT = family.TASKS["add"], family.TASKS["rise"], family.TASKS["sort"]


@pytest.mark.parametrize("response, reward", [
    (" 1 0 6", 1.0),
    (" 1 0 6</s>", 1.0),
    (" 1 0 7", 2 / 3),  # a carry slip in the last digit
    (" 1 6 0", 1 / 3),
    (" 1 0 6 6", 3 / 4),  # the stutter
    (" 1 0", 2 / 3),
    ("", 0.0),
])
def test_add_reward_gives_partial_credit_per_digit(response, reward):
    assert ADD.answer("add: 4 7 + 5 9 ->") == " 1 0 6"
    assert ADD.true_reward("add: 4 7 + 5 9 ->", response) == pytest.approx(reward)


def test_add_prompts_add_a_one_digit_number_to_a_two_digit_one():
    rng = random.Random(0)
    sums = [ADD.answer(ADD.make_prompt(rng)) for _ in range(300)]
    operands = [family._add_numbers(ADD.make_prompt(rng)) for _ in range(300)]
    assert all(10 <= a <= 99 and 1 <= b <= 9 for a, b in operands)
    assert {len(s.split()) for s in sums} == {2, 3}  # 10 + 1 up to 99 + 9


@pytest.mark.parametrize("response, reward", [
    (" c d e f", 1.0),
    (" c e h j", 1.0),  # many answers are right
    (" d e f g", 3 / 4),  # wrong start
    (" c d e f f", (1 + 3 / 4 + 3 / 4 + 4 / 5) / 4),  # the stutter: length, order, repeats
    (" c f e", (1 + 3 / 4 + 1 / 2 + 1) / 4),
    (" c", (1 + 1 / 4 + 0 + 1) / 4),
    ("", 0.0),
])
def test_rise_reward_averages_its_criteria(response, reward):
    assert RISE.true_reward("rise: c 4 ->", response) == pytest.approx(reward)


def test_sort_is_the_bundled_task_and_bad_prompts_are_errors():
    assert SORT.true_reward is synthetic.true_reward and SORT.answer is synthetic.answer
    with pytest.raises(ValueError, match="not an 'add' prompt"):
        ADD.true_reward("add: 1 2 ->", " 3")
    with pytest.raises(ValueError, match="not a 'rise' prompt"):
        RISE.true_reward("rise: c ->", " c")
    with pytest.raises(ValueError, match="unknown task 'mul'"):
        family.get("mul")


@pytest.mark.parametrize("task", list(family.TASKS.values()), ids=list(family.TASKS))
def test_answers_score_one_and_the_base_policy_stutters(task):
    rng = random.Random(0)
    stutters = 0
    for _ in range(200):
        prompt = task.make_prompt(rng)
        assert task.true_reward(prompt, task.answer(prompt)) == 1.0
        assert task.true_reward(prompt, task.right_answer(rng, prompt)) == 1.0
        words = task.candidate(rng, prompt).split()
        stutters += words[-1] == words[-2]
        kept = task.candidate(rng, prompt, True).split()
        assert len(kept) == len(task.answer(prompt).split())
    assert 0.7 < stutters / 200 < 0.95


@pytest.mark.parametrize("task", list(family.TASKS.values()), ids=list(family.TASKS))
def test_records_of_every_shape_are_valid_and_scored_by_the_true_reward(task, tmp_path):
    family.write_tokenizer(str(tmp_path))
    tok = Tokenizer.from_dir(str(tmp_path))
    cfg = DataConfig(max_length=32, max_responses=8, max_steps=5)
    builder = GroupBuilder(tok, cfg, label_mapping="minmax")
    for shape, k in (("pair", 2), ("list", 8), ("tree", 4), ("unpaired", 1), ("flipped", 2)):
        rows = list(family.records(task, shape, 30, seed=1, k=k, flip=0.5))
        assert rows == list(family.records(task, shape, 30, seed=1, k=k, flip=0.5))
        for r in rows:
            json.dumps(r)
            result = builder.build(r)
            assert result.group is not None, (shape, r, result)
            assert parse_record(r).kind == ("pair" if shape == "flipped" else shape)
            prompt = r["prompt"]
            if shape == "pair":
                assert task.true_reward(prompt, r["chosen"]) > task.true_reward(prompt,
                                                                                r["rejected"])
            if shape == "list":
                assert len(set(r["responses"])) == 8
                assert r["scores"] == [pytest.approx(task.true_reward(prompt, x), abs=1e-4)
                                       for x in r["responses"]]
            if shape == "unpaired":
                assert r["label"] == (task.true_reward(prompt, r["completion"]) == 1.0)
            if shape == "tree":
                leaves = list(family._leaves(r["tree"], ""))
                assert len(leaves) == 4
                for text, score in leaves:
                    assert score == pytest.approx(task.true_reward(prompt, text), abs=1e-4)
                bw = family.best_vs_worst(r)
                assert (task.true_reward(prompt, bw["chosen"])
                        == pytest.approx(max(s for _, s in leaves), abs=1e-4))


def test_tree_steps_carry_step_rewards():
    r = next(family.records(SORT, "tree", 1, seed=0))
    target = synthetic.answer(r["prompt"]).split()

    def walk(nodes, words):
        for node in nodes:
            path = words + [node["text"].strip()]
            if node.get("children"):
                assert node["reward"] == float(path == target[:len(path)])
                walk(node["children"], path)
            else:
                assert "reward" not in node

    walk(r["tree"], [])


def test_flipped_pairs_flip_about_the_asked_share():
    rows = list(family.records(ADD, "flipped", 400, seed=0, flip=0.3))
    flipped = sum(ADD.true_reward(r["prompt"], r["chosen"])
                  < ADD.true_reward(r["prompt"], r["rejected"]) for r in rows)
    assert 0.24 < flipped / 400 < 0.36


def test_best_vs_worst_of_a_list():
    record = {"prompt": "p", "responses": ["a", "b", "c"], "scores": [0.5, 1.0, 0.0]}
    assert family.best_vs_worst(record) == {"prompt": "p", "chosen": "b", "rejected": "c"}


def test_family_tokenizer_extends_the_bundled_one(tmp_path):
    bundled = Tokenizer.from_dir(synthetic.tokenizer_dir())
    own = Tokenizer.from_dir(family.write_tokenizer(str(tmp_path)))
    assert own.vocab_size == len(family.VOCAB) == len(synthetic.VOCAB) + 3
    text = "sort: d a c -> a c d"
    assert own.encode(text) == bundled.encode(text)  # the shared words keep their ids
    unk = family.VOCAB.index(synthetic.UNK)
    assert unk not in own.encode("add: 4 7 + 5 9 -> rise: c 4 ->")
    # The bundled tokenizer is exactly what synthetic.tokenizer_files() makes.
    for name, text in synthetic.tokenizer_files().items():
        with open(os.path.join(synthetic.tokenizer_dir(), name), encoding="utf-8") as f:
            assert f.read() == text
