"""Reward models: the Bradley–Terry / Plackett–Luce objective against numpy, the reward head
read at each response's last token in every layout, scoring, export and load back, and (slow)
a short rm_tiny training whose held-out accuracy rises."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads
from scipy.special import logsumexp

from jaxpo import cli, losses
from jaxpo.config import DataConfig, load_config
from jaxpo.data.batcher import BatchConfig, pack_groups
from jaxpo.data.errors import Where
from jaxpo.data.groups import GroupBuilder
from jaxpo.data.sources import RawRecord
from jaxpo.data.tokenize import Tokenizer
from jaxpo.models import Transformer, export_hf, get_preset, load_hf
from jaxpo.models.config import ModelConfig
from jaxpo.tasks import synthetic
from jaxpo.train import loop
from jaxpo.train.loss_inputs import BATCH_KEYS, response_rewards
from jaxpo.train.reward_model import load_scorer
from jaxpo.train.setup import build_objective, build_run, check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "configs", "rm_tiny.py")


def np_bt(chosen, rejected, margin, center=0.0):
    return np.logaddexp(0.0, -(chosen - rejected - margin)) + center * (chosen + rejected) ** 2


def np_plackett_luce(r, psi, valid):
    """Textbook Plackett–Luce over the real entries, best first (distinct labels)."""
    idx = sorted((i for i in range(len(r)) if valid[i]), key=lambda i: -psi[i])
    s = np.array([r[i] for i in idx], np.float64)
    return -sum(s[k] - logsumexp(s[k:]) for k in range(len(s)))


# ------------------------------------------------------------------------- loss functions


def test_bradley_terry_matches_numpy_with_margins():
    rng = np.random.default_rng(0)
    c, r = rng.normal(size=(2, 6)).astype(np.float32) * 3
    per_pair = rng.uniform(0, 2, 6).astype(np.float32)
    fn = jax.jit(losses.bradley_terry)
    for margin in (0.0, 0.5, per_pair):
        np.testing.assert_allclose(fn(c, r, margin=margin), np_bt(c, r, margin), rtol=1e-5)
    check_grads(jax.jit(lambda a, b: losses.bradley_terry(a, b, margin=per_pair)), (c, r),
                order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    # vmap over a batch axis equals the loop; large gaps stay finite
    batched = jax.vmap(lambda a, b: losses.bradley_terry(a, b, margin=0.5))(c, r)
    np.testing.assert_allclose(batched, np_bt(c, r, 0.5), rtol=1e-5)
    assert np.isfinite(losses.bradley_terry(jnp.float32(-1e4), jnp.float32(1e4)))
    # TRL's center_rewards_coefficient: + c (r_c + r_r)^2
    np.testing.assert_allclose(fn(c, r, margin=per_pair, center_rewards_coefficient=0.01),
                               np_bt(c, r, per_pair, 0.01), rtol=1e-5)


def test_plackett_luce_matches_numpy_and_is_bradley_terry_for_two():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(5, 4)).astype(np.float32) * 2
    psi = np.stack([rng.permutation(4) for _ in range(5)]).astype(np.float32)
    valid = rng.uniform(size=(5, 4)) > 0.25
    fn = jax.jit(losses.plackett_luce)
    out = fn(r, psi, where=valid)
    want = [np_plackett_luce(r[g], psi[g], valid[g]) for g in range(5)]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    pair = fn(r[:, :2], np.array([1.0, 0.0]))
    np.testing.assert_allclose(pair, np_bt(r[:, 0], r[:, 1], 0.0), rtol=1e-5)
    centered = fn(r, psi, where=valid, center_rewards_coefficient=0.1)
    np.testing.assert_allclose(
        centered, np.array(want) + 0.1 * np.sum(np.where(valid, r, 0), axis=-1) ** 2, rtol=1e-5)
    pair = fn(r[:, :2], np.array([1.0, 0.0]), center_rewards_coefficient=0.1)
    np.testing.assert_allclose(pair, np_bt(r[:, 0], r[:, 1], 0.0, 0.1), rtol=1e-5)
    # all masked: 0 and finite gradients
    none = np.zeros((5, 4), bool)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda x: jnp.sum(losses.plackett_luce(x, psi, where=none))))(r)
    assert float(loss) == 0.0 and np.all(np.isfinite(grads))


def _inputs(rewards, scores, response_mask=None, group_mask=None):
    rewards = np.asarray(rewards, np.float32)
    return losses.LossInputs(
        policy_logps=None, rewards=rewards, scores=np.asarray(scores, np.float32),
        num_tokens=np.ones(rewards.shape, np.float32),
        response_mask=np.ones(rewards.shape, bool) if response_mask is None else response_mask,
        group_mask=np.ones(rewards.shape[0], bool) if group_mask is None else group_mask)


def test_objective_pairs_lists_and_metrics():
    obj = losses.get("bradley_terry")
    assert obj.logps == "reward" and "rewards" in obj.needs and not obj.needs_reference
    call = jax.jit(lambda inputs, margin=0.0: obj(inputs, margin=margin), static_argnums=1)
    metrics_of = jax.jit(losses.reward_metrics)
    rewards = np.array([[1.0, -0.5], [0.2, 0.9], [3.0, 1.0]], np.float32)
    pairs = _inputs(rewards, [[1, 0]] * 3, group_mask=np.array([True, True, False]))
    got = call(pairs, 0.25)
    np.testing.assert_allclose(got[:2], np_bt(rewards[:2, 0], rewards[:2, 1], 0.25), rtol=1e-5)
    assert float(got[2]) == 0.0  # padding group
    metrics = metrics_of(pairs)
    real = rewards[:2].ravel()
    np.testing.assert_allclose(metrics["accuracy"], 0.5)
    np.testing.assert_allclose(metrics["margin"], np.mean(rewards[:2, 0] - rewards[:2, 1]),
                               rtol=1e-6)
    np.testing.assert_allclose(metrics["mean_reward"], real.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["std_reward"], real.std(), rtol=1e-5)
    assert float(metrics["min_reward"]) == real.min() and float(metrics["max_reward"]) == real.max()

    lists = np.array([[0.3, 2.0, -1.0, 0.5]], np.float32)
    scores = np.array([[0.2, 1.0, 0.0, 0.7]], np.float32)
    mask = np.array([[True, True, True, False]])
    got = call(_inputs(lists, scores, response_mask=mask))
    np.testing.assert_allclose(got, [np_plackett_luce(lists[0], scores[0], mask[0])], rtol=1e-5)
    ranking = metrics_of(_inputs(lists, scores, response_mask=mask))
    np.testing.assert_allclose(ranking["ranking/accuracy"], 1.0)
    with pytest.raises(ValueError, match="margin=0.5 applies to pairs"):
        call(_inputs(lists, scores), 0.5)
    # two responses with tied labels carry no preference
    assert float(call(_inputs([[1.0, 2.0]], [[0.5, 0.5]]))[0]) == 0.0


def test_config_pairs_the_objective_with_the_reward_head():
    rm = load_config(PRESET)
    check(rm, build_objective(rm)[0])
    lm_head = load_config(PRESET, ["--config.model.head=lm"])
    with pytest.raises(ValueError, match="set config.model.head=reward"):
        check(lm_head, build_objective(lm_head)[0])
    dpo = load_config(PRESET, ["--config.loss.name=dpo"])
    with pytest.raises(ValueError, match="set config.model.head=lm"):
        check(dpo, build_objective(dpo)[0])
    mixed = load_config(PRESET, ["--config.loss.name=bradley_terry + 0.1*sft"])
    with pytest.raises(ValueError, match="used alone"):
        check(mixed, build_objective(mixed)[0])
    with pytest.raises(ValueError, match="config.model.lora.rank=4"):  # a frozen head
        load_config(PRESET, ["--config.model.lora.rank=4"])
    with pytest.raises(ValueError, match="config.model.head='value'"):
        load_config(PRESET, ["--config.model.head=value"])


# ------------------------------------------------------------------------- the reward head


@pytest.fixture(scope="module")
def tiny_rm():
    tok = Tokenizer.from_dir(synthetic.tokenizer_dir())
    cfg = get_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, head="reward",
                     attention="dense")  # compiles faster; the layouts' masks are the same
    return tok, nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(3)))()


@nnx.jit
def _causal_rewards(model, tokens):
    """Per-position rewards of ``[B, T]`` sequences, each run alone from position 0."""
    ones, zeros = jnp.ones_like(tokens), jnp.zeros_like(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model.reward(model.hidden(tokens, positions, ones, zeros, zeros))  # [B, T]


def _alone(model, sequences):
    """The reward of each token sequence run on its own: the head at its last token (later
    padding is never seen: attention is causal)."""
    padded = np.zeros((16, 48), np.int32)  # one shape: one compilation
    for i, seq in enumerate(sequences):
        padded[i, :len(seq)] = seq
    values = np.asarray(_causal_rewards(model, jnp.asarray(padded)))
    return np.array([values[i, len(seq) - 1] for i, seq in enumerate(sequences)], np.float32)


@pytest.mark.parametrize("pad", ["distinct", "eos"])
def test_reward_is_read_at_each_response_end_in_every_layout(tiny_rm, pad):
    """Trees: responses share the prompt and leading steps (share_prefix lays them out once),
    the padded layout repeats them; pairs are the one-step case of the same path. The reward
    is read at the last token that is not the padding token, as transformers reads a row: the
    EOS when the padding token is another token, the token before it when it is the EOS."""
    tok, model = tiny_rm
    if pad == "eos":  # the same weights, read before each response's closing EOS
        cfg = model.config.replace(pad_token_id=tok.eos_id)
        model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(3)))),
                          nnx.state(model))
    base = DataConfig(format="tree", max_length=32, max_responses=4, max_steps=6, batch_size=3)
    groups = list(map(GroupBuilder(tok, base), synthetic.records("tree", 3, seed=5)))
    assert all(g is not None for g in groups) and max(map(len, groups[0].responses)) > 1
    graphdef, params = nnx.split(model)
    want = np.zeros((3, base.max_responses), np.float32)
    index = [(g, k) for g, group in enumerate(groups) for k in range(group.num_responses)]
    sequences = [np.concatenate([groups[g].node_tokens[0], groups[g].response_tokens(k)])
                 for g, k in index]
    assert all(seq[-1] == tok.eos_id for seq in sequences)
    if pad == "eos":
        sequences = [seq[:-1] for seq in sequences]
    alone = _alone(model, sequences)
    for (g, k), value in zip(index, alone):
        want[g, k] = value
    for layout in ("padded", "packed", "share_prefix"):
        cfg = BatchConfig.from_data_config(DataConfig(**{**base.__dict__, "layout": layout}))
        batch = pack_groups(groups, cfg)
        got = jax.jit(lambda p, b, n=cfg.node_slots: response_rewards(graphdef, p, b,
                                                                      num_nodes=n))(
            params, {k: batch[k] for k in BATCH_KEYS})
        mask = batch["response_mask"]
        np.testing.assert_allclose(np.where(mask, got, 0), np.where(mask, want, 0), rtol=2e-4,
                                   atol=1e-6, err_msg=layout)


def test_each_pairs_margin_field_reaches_the_loss(tiny_rm):
    """A pair record's ``margin`` (TRL's reward-data column) is added to the configured margin
    for that pair: the batch carries it, the objective reads it; a bad one names the field."""
    tok, model = tiny_rm
    records = [{"prompt": f"sort: {x} ->", "chosen": f" {y}", "rejected": f" {z}", **extra}
               for x, y, z, extra in [("c a b", "a b c", "a c b", {"margin": 1.5}),
                                      ("e d", "d e", "e d", {}),
                                      ("h g i", "g h i", "g g g", {"margin": -0.25})]]
    data = DataConfig(format="pair", max_length=24, batch_size=4)
    groups = [GroupBuilder(tok, data)(RawRecord(i, r, Where('rm.jsonl', i + 1)))
              for i, r in enumerate(records)]
    batch = pack_groups(groups, BatchConfig.from_data_config(data))
    np.testing.assert_array_equal(batch["margin"], [1.5, 0.0, -0.25, 0.0])
    graphdef, params = nnx.split(model)
    spec_nodes = BatchConfig.from_data_config(data).node_slots
    rewards = jax.jit(lambda p, b: response_rewards(graphdef, p, b, num_nodes=spec_nodes))(
        params, {k: batch[k] for k in BATCH_KEYS})
    inputs = _inputs(rewards, batch["scores"], response_mask=batch["response_mask"],
                     group_mask=batch["group_mask"])
    inputs = dataclasses.replace(inputs, reward_margin=jnp.asarray(batch["margin"]))
    got = jax.jit(lambda i: losses.get("bradley_terry")(
        i, margin=0.5, center_rewards_coefficient=0.05))(inputs)
    r = np.asarray(rewards)
    want = np_bt(r[:3, 0], r[:3, 1], 0.5 + np.array([1.5, 0.0, -0.25]), 0.05)
    np.testing.assert_allclose(got[:3], want, rtol=1e-5)
    assert float(got[3]) == 0.0
    bad = {**records[0], "margin": "big"}
    with pytest.raises(ValueError, match="rm.jsonl:row 7: field 'margin': expected a number"):
        GroupBuilder(tok, data)(RawRecord(6, bad, Where('rm.jsonl', 7)))


def test_the_run_reads_the_margin_field(tmp_path):
    """Through the run's own data path and eval step: records that all carry margin 0.7 give
    the loss of records without one under loss.kwargs=margin=0.7, and not the plain loss."""
    records = [r for r in synthetic.records("pair", 24, seed=3)]

    def eval_loss(name, extra, overrides=()):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({**r, **extra}) + "\n" for r in records))
        config = load_config(PRESET, [f"--config.data.eval_files={path}",
                                      "--config.train.eval_batches=2", *overrides])
        return loop.evaluate(config, str(tmp_path / "w"), untrained=True)["eval/loss"]

    with_field = eval_loss("field", {"margin": 0.7})
    with_kwarg = eval_loss("plain", {}, ["--config.loss.kwargs=margin=0.7"])
    plain = eval_loss("plain", {})
    np.testing.assert_allclose(with_field, with_kwarg, rtol=1e-6)
    assert with_field > plain + 0.1  # a margin makes the same rewards cost more


def test_export_records_the_padding_token(tmp_path):
    """transformers' *ForSequenceClassification finds each row's last token from
    config.pad_token_id and refuses batches without one: export writes the tokenizer's."""
    assert cli.main(["export", f"--config={PRESET}", "--untrained",
                     f"--out={tmp_path / 'rm'}"]) == 0
    hf = json.loads((tmp_path / "rm" / "config.json").read_text())
    tok = Tokenizer.from_dir(synthetic.tokenizer_dir())
    assert hf["pad_token_id"] == tok.token_id("<pad>") is not None
    assert hf["pad_token_id"] != tok.eos_id


def test_model_config_round_trips_as_sequence_classification(tiny_rm):
    cfg = tiny_rm[1].config
    hf = cfg.to_hf()
    assert hf["architectures"] == ["LlamaForSequenceClassification"] and hf["num_labels"] == 1
    assert ModelConfig.from_hf(hf, attention=cfg.attention) == cfg
    with pytest.raises(ValueError, match="num_labels"):
        ModelConfig.from_hf({**hf, "num_labels": 2, "id2label": {"0": "a", "1": "b"}})
    with pytest.raises(ValueError, match="no next-token distribution"):
        tiny_rm[1].unembedding()


def test_a_reward_model_starts_from_a_causal_lm_checkpoint(tiny_rm, tmp_path):
    """model.path = a causal LM's HF dir with model.head=reward: its decoder, a zero head."""
    from safetensors.numpy import load_file, save_file

    model = tiny_rm[1]
    export_hf(model, str(tmp_path / "lm"))  # then made a causal LM's checkpoint:
    weights = load_file(tmp_path / "lm" / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"][::-1].copy()  # untied
    del weights["score.weight"]
    save_file(weights, tmp_path / "lm" / "model.safetensors")
    hf = json.loads((tmp_path / "lm" / "config.json").read_text())
    hf = {k: v for k, v in hf.items() if k not in ("num_labels", "id2label", "label2id")}
    hf.update(architectures=["LlamaForCausalLM"], tie_word_embeddings=False)
    (tmp_path / "lm" / "config.json").write_text(json.dumps(hf))
    rm = load_hf(str(tmp_path / "lm"), head="reward")  # the untied LM's lm_head is not read
    assert rm.config.head == "reward" and not hasattr(rm, "lm_head")
    np.testing.assert_array_equal(rm.score[...], np.zeros((model.config.hidden_size, 1)))
    np.testing.assert_array_equal(rm.layers.mlp.up[...], model.layers.mlp.up[...])
    np.testing.assert_array_equal(rm.embed[...], model.embed[...])


def test_a_reward_model_starts_from_a_causal_lm_run(tmp_path):
    """model.init_from = a jaxpo causal-LM workdir with model.head=reward: that run's decoder
    and a zero score head; the other way round is refused by name."""
    lm_dir = str(tmp_path / "sft")
    sft = load_config(os.path.join(ROOT, "configs", "sft_tiny.py"),
                      ["--config.train.steps=1", "--config.train.checkpoint_every=1"])
    loop.train(sft, lm_dir, progress=False)
    lm_params, _, _ = loop.load_params(build_run(sft), lm_dir)
    rm_run = build_run(load_config(PRESET, [f"--config.model.init_from={lm_dir}"]))
    rm_params = rm_run.initial_params()
    lm_flat, rm_flat = (dict(nnx.to_flat_state(p)) for p in (lm_params, rm_params))
    assert set(rm_flat) == set(lm_flat) - {("lm_head",)} | {("score",)}
    for path, value in rm_flat.items():
        want = np.zeros(value.shape) if path == ("score",) else lm_flat[path].get_value()
        np.testing.assert_array_equal(value.get_value(), want, err_msg=str(path))
    rm_dir = str(tmp_path / "rm")
    loop.train(load_config(PRESET, ["--config.train.steps=1", "--config.train.eval_every=0"]),
               rm_dir, progress=False)
    with pytest.raises(ValueError, match="is a reward model"):
        build_run(load_config(os.path.join(ROOT, "configs", "sft_tiny.py"),
                              [f"--config.model.init_from={rm_dir}"])).initial_params()


def _export(model, path):
    export_hf(model, str(path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(synthetic.tokenizer_dir(), name), path / name)


def test_export_loads_back_with_the_same_rewards_and_score_command(tiny_rm, tmp_path, capsys):
    tok, model = tiny_rm
    _export(model, tmp_path / "rm")
    names = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert names["architectures"] == ["LlamaForSequenceClassification"]
    back = load_hf(str(tmp_path / "rm"))
    np.testing.assert_array_equal(back.score[...], model.score[...])

    prompts = ["sort: c a b ->", "sort: e d ->", "sort: j i h g ->"]
    responses = [" a b c", " d e e", " g h i j"]
    # plain text: the response closed by the EOS text, tokenised after its prompt
    want = _alone(model, [tok.encode(p + r + "</s>") for p, r in zip(prompts, responses)])

    records = tmp_path / "in.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": prompts[0], "response": responses[0]},
        {"prompt": prompts[1], "completion": responses[1]},
        {"prompt": prompts[2], "chosen": responses[2], "rejected": " g h"}]) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli.main(["score", f"--model={tmp_path / 'rm'}", f"--in={records}",
                     f"--out={out}"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    np.testing.assert_allclose([rows[0]["reward"], rows[1]["reward"], rows[2]["chosen_reward"]],
                               want, rtol=1e-5, atol=1e-6)
    assert rows[2]["rejected"] == " g h" and "rejected_reward" in rows[2]

    records.write_text(json.dumps({"prompt": "sort: a ->", "answer": " a"}) + "\n")
    assert cli.main(["score", f"--model={tmp_path / 'rm'}", f"--in={records}",
                     f"--out={out}"]) == 2
    assert f"{records}:1: field 'response': missing" in capsys.readouterr().err
    records.write_text(json.dumps({"prompt": "sort: a ->", "response": 3}) + "\n")
    assert cli.main(["score", f"--model={tmp_path / 'rm'}", f"--in={records}",
                     f"--out={out}"]) == 2
    assert f"{records}:1: field 'response': expected a string" in capsys.readouterr().err
    assert cli.main(["score", f"--in={records}", f"--out={out}"]) == 2
    assert "give one of --workdir" in capsys.readouterr().err


# ------------------------------------------------------------------------- training (slow)


@pytest.mark.slow
def test_rm_tiny_accuracy_rises_and_the_workdir_exports(tmp_path, capsys):
    config = load_config(PRESET, ["--config.train.eval_every=0"])  # 200 steps, eval at the end
    workdir = str(tmp_path / "rm")
    before = loop.evaluate(config, workdir, untrained=True)
    summary = loop.train(config, workdir, progress=False)
    after = summary["eval"]
    print(f"held-out pair accuracy {before['eval/accuracy']:.3f} -> {after['eval/accuracy']:.3f}")
    assert 0.3 <= before["eval/accuracy"] <= 0.7
    assert after["eval/accuracy"] >= 0.7 and after["eval/loss"] < before["eval/loss"] - 0.05

    # the run's scorer and its export's give the same rewards
    assert cli.main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'hf'}"]) == 0
    eval_file = tmp_path / "rm" / "data" / "pair_eval.jsonl"
    rows = [json.loads(line) for line in eval_file.read_text().splitlines()][:40]
    prompts, chosen = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    rejected = [r["rejected"] for r in rows]
    from_run = load_scorer(workdir)
    from_export = load_scorer(str(tmp_path / "hf"))
    np.testing.assert_allclose(from_run(prompts, chosen), from_export(prompts, chosen),
                               rtol=1e-5, atol=1e-6)
    accuracy = np.mean(from_run(prompts, chosen) > from_run(prompts, rejected))
    assert accuracy >= 0.7
