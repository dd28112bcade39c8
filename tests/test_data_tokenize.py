"""Tokenisation, chat templates, length limits and group building (jaxpo.data.tokenize / groups)."""

import dataclasses
import json
import os
import pickle
import shutil

import hypothesis
import hypothesis.strategies as st
import jinja2
import numpy as np
import pytest

from jaxpo.config import DataConfig
from jaxpo.data.errors import BadRecordError, Where
from jaxpo.data.groups import GroupBuilder
from jaxpo.data.sources import RawRecord, RecordSource
from jaxpo.data.tokenize import Tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
with open(os.path.join(FIXTURES, "tokenization_expected.json")) as _f:
    EXPECTED = json.load(_f)["cases"]
_TOKENIZERS = {}


def tokenizer(name="tokenizer_chatml"):
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = Tokenizer.from_dir(os.path.join(FIXTURES, name))
    return _TOKENIZERS[name]


CFG = DataConfig(max_responses=4, max_steps=3)  # room for every test record


def builder_for(tok, **kw):
    """A GroupBuilder over ``CFG`` with some data config fields replaced."""
    return GroupBuilder(tok, dataclasses.replace(CFG, **kw))


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# Same ids as TRL -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", EXPECTED, ids=[f"{c['tokenizer']}-{c['name']}" for c in EXPECTED])
def test_ids_match_trl(case):
    """Prompt / chosen / rejected ids equal those TRL's DPO preprocessing recorded."""
    builder = builder_for(tokenizer(case["tokenizer"]), max_length=case["max_length"] or 1 << 20)
    group = builder(case["record"])
    if case.get("dropped"):
        assert group is None and builder.counters["dropped/prompt_too_long"] == 1
        return
    assert group.kind == "pair" and group.node_parent == [-1, 0, 0]
    assert group.node_tokens[0].tolist() == case["prompt_ids"]
    assert group.response_tokens(0).tolist() == case["chosen_ids"]
    assert group.response_tokens(1).tolist() == case["rejected_ids"]
    assert group.scores.tolist() == [1.0, 0.0]


def test_bos_and_eos_placement_for_plain_text():
    tok = tokenizer("tokenizer_llama3")
    group = builder_for(tok)({"prompt": "Hello!", "chosen": " Hi.", "rejected": " No."})
    bos, eos = tok.bos_id, tok.eos_id
    assert group.node_tokens[0][0] == bos and (group.node_tokens[0] == bos).sum() == 1
    for k in range(2):
        assert group.response_tokens(k)[-1] == eos and (group.response_tokens(k) == bos).sum() == 0
    chatml = tokenizer("tokenizer_chatml")  # no BOS at all
    group = builder_for(chatml)({"prompt": "Hello!", "chosen": " Hi.", "rejected": " No."})
    assert chatml.decode(group.node_tokens[0]) == "Hello!"
    assert group.response_tokens(0)[-1] == chatml.eos_id


# Chat templates ------------------------------------------------------------------------------


def test_list_form_template_and_special_token_variables():
    tok = tokenizer("tokenizer_chatml")
    text = tok.apply_chat_template(user("hi"), add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    llama = tokenizer("tokenizer_llama3")
    assert llama.apply_chat_template(user(" hi ")).startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")


def test_chat_template_jinja_file_wins_and_helpers_exist(tmp_path):
    shutil.copy(os.path.join(FIXTURES, "tokenizer_chatml", "tokenizer.json"), tmp_path)
    shutil.copy(os.path.join(FIXTURES, "tokenizer_chatml", "tokenizer_config.json"), tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}:{{ m['content'] | tojson }}"
        "{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}{% endfor %}"
        "[{{ strftime_now('%Y') | length }}]{{ eos_token }}")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template(user("a<b>")) == 'user:"a<b>"[4]<|im_end|>'
    with pytest.raises(jinja2.exceptions.TemplateError, match="no tools"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    again = pickle.loads(pickle.dumps(tok))
    assert again.apply_chat_template(user("z")) == tok.apply_chat_template(user("z"))


def test_template_is_sandboxed(tmp_path):
    tok = Tokenizer(tokenizer("tokenizer_chatml")._json, {},
                    "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template(user("x"))
    with pytest.raises(ValueError, match="chat template"):
        Tokenizer(tok._json, {}).apply_chat_template(user("x"))


def test_template_error_is_a_bad_record():
    record = {"prompt": [{"role": "tool", "content": "x"}], "chosen": assistant("a"),
              "rejected": assistant("b")}
    raw = RawRecord(3, record, Where("t.jsonl", 4, "line"))
    with pytest.raises(BadRecordError, match=r"t.jsonl:4: field 'prompt': chat template error"):
        builder_for(tokenizer())(raw)
    builder = builder_for(tokenizer(), on_bad_record="skip")
    assert builder(raw) is None and builder.counters["skipped/chat_template"] == 1


# Length limits -------------------------------------------------------------------------------

LONG = {"prompt": "Paris is the capital of France. Berlin is the capital of Germany.",
        "chosen": " First, add the numbers. Then, divide by two.", "rejected": " No."}


def full_group(record, **kw):
    return builder_for(tokenizer(), **kw)(record)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_max_prompt_length_keeps_the_chosen_end(mode):
    ref = full_group(LONG)
    builder = builder_for(tokenizer(), max_prompt_length=5, truncation_mode=mode)
    group = builder(LONG)
    want = ref.node_tokens[0][:5] if mode == "keep_start" else ref.node_tokens[0][-5:]
    np.testing.assert_array_equal(group.node_tokens[0], want)
    np.testing.assert_array_equal(group.response_tokens(0), ref.response_tokens(0))
    assert builder.counters["truncated/prompt"] == 1


def test_max_length_cuts_responses_at_their_end():
    ref = full_group(LONG)
    p = len(ref.node_tokens[0])
    builder = builder_for(tokenizer(), max_length=p + 4)
    group = builder(LONG)
    np.testing.assert_array_equal(group.response_tokens(0), ref.response_tokens(0)[:4])
    np.testing.assert_array_equal(group.response_tokens(1), ref.response_tokens(1)[:4])
    assert builder.counters["truncated/response"] == 1 + (len(ref.response_tokens(1)) > 4)
    builder = builder_for(tokenizer(), max_length=p)
    assert builder(LONG) is None and builder.counters["dropped/prompt_too_long"] == 1


def test_responses_identical_after_truncation_drop_the_group():
    record = {"prompt": "Hello!", "responses": [" Paris is the capital of France.",
                                                " Paris is the capital of Germany."],
              "scores": [1, 0]}
    p = len(full_group(record).node_tokens[0])
    builder = builder_for(tokenizer(), max_length=p + 3)
    assert builder(record) is None
    assert builder.counters["dropped/duplicate_after_truncation"] == 1


TREE = {"prompt": "Add 20 and 1.", "tree": {"text": " First, add the numbers: 21.", "children": [
    {"text": " Then divide by 3: 7.", "score": 1.0},
    {"text": " Then divide by two, which gives", "children": [
        {"text": " 10.5.", "score": 0.5}, {"text": " 10.", "score": 0.25}]},
    {"text": " No.", "score": 0.0}]}}


def test_tree_shares_steps_and_closes_leaves_with_eos():
    tok = tokenizer()
    group = builder_for(tok)(TREE)
    assert group.kind == "tree" and len(group.node_tokens) == 7
    assert group.node_parent == [-1, 0, 1, 1, 3, 3, 1]
    assert group.responses == [[1, 2], [1, 3, 4], [1, 3, 5], [1, 6]]
    shared = tok.encode(" First, add the numbers: 21.", add_special_tokens=False)
    assert group.node_tokens[1].tolist() == shared
    assert group.node_tokens[5].tolist() == tok.encode(" 10.<|im_end|>", add_special_tokens=False)
    assert group.response_tokens(2)[-1] == tok.eos_id and group.node_tokens[3][-1] != tok.eos_id
    np.testing.assert_allclose(group.scores, [1.0, 0.5, 0.25, 0.0])


def test_flat_and_nested_trees_give_the_same_group():
    flat = {"prompt": TREE["prompt"], "responses": [
        {"steps": [" First, add the numbers: 21.", " Then divide by 3: 7."], "score": 1.0},
        {"steps": [" First, add the numbers: 21.", " Then divide by two, which gives", " 10.5."],
         "score": 0.5},
        {"steps": [" First, add the numbers: 21.", " Then divide by two, which gives", " 10."],
         "score": 0.25},
        {"steps": [" First, add the numbers: 21.", " No."], "score": 0.0}]}
    a, b = builder_for(tokenizer())(TREE), builder_for(tokenizer())(flat)
    assert a.node_parent == b.node_parent and a.responses == b.responses
    assert [t.tolist() for t in a.node_tokens] == [t.tolist() for t in b.node_tokens]


def test_conversational_tree_leaves_end_like_a_rendered_assistant_turn():
    tok = tokenizer()
    record = {"prompt": user("Add 20 and 1."), "tree": {"children": [
        {"text": "21.", "score": 1}, {"text": "12.", "score": 0}]}}
    group = builder_for(tok)(record)
    pair = builder_for(tok)({"prompt": user("Add 20 and 1."), "chosen": assistant("21."),
                              "rejected": assistant("12.")})
    assert [t.tolist() for t in group.node_tokens] == [t.tolist() for t in pair.node_tokens]


def test_tree_truncation_cuts_private_steps_and_drops_responses_cut_in_shared_ones():
    ref = builder_for(tokenizer())(TREE)
    p, first = len(ref.node_tokens[0]), len(ref.node_tokens[1])
    builder = builder_for(tokenizer(), max_length=p + first + 2)
    group = builder(TREE)
    # The shared " Then divide by two, which gives" step does not fit: both its leaves go.
    assert group.num_responses == 2 and len(group.node_tokens) == 4
    assert group.node_parent == [-1, 0, 1, 1]
    np.testing.assert_array_equal(group.response_tokens(0), ref.response_tokens(0)[:first + 2])
    np.testing.assert_allclose(group.scores, [1.0, 0.0])  # ψ re-mapped on the survivors
    assert builder.counters["dropped_response/shared_step_too_long"] == 2
    builder = builder_for(tokenizer(), max_length=p + first - 1)
    assert builder(TREE) is None
    assert builder.counters["dropped/shared_step_too_long"] == 1


# Groups of every kind, counters, pickling ----------------------------------------------------


def test_fixture_files_of_every_kind_build_in_jsonl_and_parquet():
    kinds = {"pairs_explicit": "pair", "pairs_implicit": "pair", "pairs_conversational": "pair",
             "lists": "list", "trees": "tree", "trees_flat": "tree", "unpaired": "unpaired"}
    for name, kind in kinds.items():
        for ext in ("jsonl", "parquet"):
            src = RecordSource(os.path.join(FIXTURES, f"{name}.{ext}"))
            builder = builder_for(tokenizer("tokenizer_llama3"))
            groups = [builder(src[i]) for i in range(len(src))]
            assert all(g is not None and g.kind == kind for g in groups), (name, ext)
            assert [g.id for g in groups] == list(range(len(src)))
            for g in groups:
                assert all(p < n for n, p in enumerate(g.node_parent))
                assert g.scores.shape == (g.num_responses,) and g.scores.dtype == np.float32
                assert all(len(t) > 0 for t in g.node_tokens)
    src = RecordSource(os.path.join(FIXTURES, "pairs_explicit.parquet"))
    group = builder_for(tokenizer())(src[1])
    np.testing.assert_array_equal(group.ref_logps, np.float32([-6.0, -2.5]))


def test_list_and_unpaired_labels():
    group = full_group({"prompt": "p", "responses": [" a", " b", " c"], "ranks": [2, 3, 1]})
    np.testing.assert_allclose(group.scores, [0.5, 0.0, 1.0])
    group = full_group({"prompt": "p", "responses": [" a", " b", " c"], "scores": [1, 3, 2]},
                       label_mapping="raw")
    np.testing.assert_allclose(group.scores, [1, 3, 2])
    assert full_group({"prompt": "p", "completion": " a", "label": False}).scores.tolist() == [0]


def test_skip_mode_counts_by_reason_and_build_reports_counts(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [{"prompt": "p", "chosen": " a", "rejected": " b"},
             {"prompt": "p", "responses": [" a", " b"], "scores": [1, float("nan")]},
             {"prompt": "p", "chosen": " a", "rejected": " a"},
             {"prompt": "p", "responses": [" a", " b"], "scores": [1, 2]}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n{broken\n")
    src = RecordSource(str(path))
    with pytest.raises(BadRecordError, match=rf"{path}:2: field 'scores': NaN"):
        [builder_for(tokenizer())(src[i]) for i in range(len(src))]
    builder = builder_for(tokenizer(), on_bad_record="skip")
    groups = [builder(src[i]) for i in range(len(src))]
    assert [g is not None for g in groups] == [True, False, False, True, False]
    assert builder.counters.as_metrics() == {
        "data/groups": 2, "data/skipped/bad_json": 1, "data/skipped/identical_responses": 1,
        "data/skipped/nan_score": 1}
    result = builder.build(src[1])
    assert result.group is None and result.counts == {"skipped/nan_score": 1}
    assert result.error.field == "scores"


def test_builder_pickles_and_works_in_grain():
    import grain

    builder = builder_for(tokenizer(), max_length=64, on_bad_record="skip")
    builder(TREE)
    again = pickle.loads(pickle.dumps(builder))
    assert again.cfg == builder.cfg and again.counters["groups"] == 1
    a, b = builder(TREE), again(TREE)
    assert [t.tolist() for t in a.node_tokens] == [t.tolist() for t in b.node_tokens]
    src = RecordSource(os.path.join(FIXTURES, "lists.jsonl"))
    ds = grain.MapDataset.source(src).map(builder)
    assert [ds[i].num_responses for i in range(len(ds))] == [4, 2, 3]


def test_builder_reads_the_data_config_fields():
    builder = GroupBuilder(tokenizer(), DataConfig())  # the run's defaults
    assert builder.label_mapping == "minmax"
    group = builder(LONG)  # max_prompt_length=0: no prompt limit
    np.testing.assert_array_equal(group.node_tokens[0], full_group(LONG).node_tokens[0])
    assert builder.counters["truncated/prompt"] == 0
    three = {"prompt": "p", "responses": [" a", " b", " c"], "scores": [1, 2, 3]}
    with pytest.raises(BadRecordError, match="K=3 > max_responses=2"):
        GroupBuilder(tokenizer(), DataConfig(max_responses=2))(three)
    with pytest.raises(BadRecordError, match="> max_steps=1"):
        GroupBuilder(tokenizer(), DataConfig(max_responses=4))(TREE)
    with pytest.raises(TypeError, match="jaxpo.config.DataConfig"):
        GroupBuilder(tokenizer(), {"max_length": 64})
    with pytest.raises(ValueError, match="label_mapping='softmax'"):
        GroupBuilder(tokenizer(), CFG, label_mapping="softmax")


def _bradley_terry(s):
    s = np.asarray(s, np.float64)
    return [np.mean([1 / (1 + np.exp(s[j] - s[i])) for j in range(len(s)) if j != i])
            for i in range(len(s))]


SCORES, LEAVES = [0.0, 10.0, 1.0], [2.0, -1.0]


@pytest.mark.parametrize("data_mapping, objective_mapping, mapping", [
    ("", None, "minmax"),  # neither says: minmax
    ("", "raw", "raw"),  # the objective's own (pro, infonca want raw rewards)
    ("raw", None, "raw"),
    ("winrate", "raw", "winrate"),  # the data config, when set, wins
    ("bradley_terry", "minmax", "bradley_terry"),
])
def test_label_mapping_from_the_data_config_else_the_objective(data_mapping, objective_mapping,
                                                              mapping):
    want = {"minmax": ([0.0, 1.0, 0.1], [1.0, 0.0]), "raw": (SCORES, LEAVES),
            "winrate": ([0.0, 1.0, 0.5], [1.0, 0.0]),
            "bradley_terry": (_bradley_terry(SCORES), _bradley_terry(LEAVES))}[mapping]
    builder = GroupBuilder(tokenizer(), dataclasses.replace(CFG, label_mapping=data_mapping),
                           label_mapping=objective_mapping)
    assert builder.label_mapping == mapping
    group = builder({"prompt": "p", "responses": [" a", " b", " c"], "scores": SCORES})
    np.testing.assert_allclose(group.scores, want[0], rtol=1e-6)
    tree = builder({"prompt": "p", "tree": {"children": [{"text": " a", "score": LEAVES[0]},
                                                         {"text": " b", "score": LEAVES[1]}]}})
    np.testing.assert_allclose(tree.scores, want[1], rtol=1e-6)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    prompt=st.text(alphabet="ab .?", min_size=1, max_size=12),
    responses=st.lists(st.text(alphabet="ab .!", min_size=1, max_size=10), min_size=2,
                       max_size=4, unique=True))
def test_prompt_plus_response_tokens_decode_to_the_text(prompt, responses):
    """Splitting at the common prefix loses no text: prompt + response_k decodes to the record."""
    tok = tokenizer("tokenizer_llama3")
    record = {"prompt": prompt, "responses": responses, "scores": list(range(len(responses)))}
    group = builder_for(tok)(record)
    if group is None:  # only when two responses tokenise identically: impossible for unique text
        pytest.fail("group dropped")
    for k, text in enumerate(responses):
        ids = np.concatenate([group.node_tokens[0], group.response_tokens(k)])
        assert tok.decode(ids) == "<|begin_of_text|>" + prompt + text + "<|eot_id|>"
        assert len(group.response_tokens(k)) > 0
