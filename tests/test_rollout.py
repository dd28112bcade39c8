"""On-policy training (jaxpo.train.rollout): config, reward sources, groups from scores, the
sampler (compiled once, deterministic), the iterator's checkpointed state; slow: online DPO
improves the true reward, and a kill -9 resume is bitwise exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from _multidevice import REPO_ROOT, run_snippet, snippet_env
from test_train_loop import compiles  # noqa: F401  (the compile-counting fixture)
from test_train_resume import _checkpoints, _finish, _logged_steps, _wait_for

from jaxpo.config import Config, load_config
from jaxpo.tasks import synthetic
from jaxpo.train import inputs, loop, reward_model, rollout, sampler
from jaxpo.train.setup import build_run

TESTS = os.path.dirname(os.path.abspath(__file__))


def early_letters(prompts, responses):
    """A reward for the tests: how many of the letters a-e a response holds (an untrained
    model's samples differ in it, where the true reward is 0 for almost all of them)."""
    return [float(sum(w in "abcde" for w in r.split())) for r in responses]


def wrong_length(prompts, responses):
    return [0.0]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(("override", "field"), [
    ("every=0", "rollout.every"), ("num_samples=1", "rollout.num_samples"),
    ("temperature=0", "rollout.temperature"), ("top_p=1.5", "rollout.top_p"),
    ("max_new_tokens=0", "rollout.max_new_tokens"), ("build=forest", "rollout.build"),
    ("reward=nothing", "rollout.reward"), ("reward=rm:", "rollout.reward"),
    ("prompts_per_rollout=0", "rollout.prompts_per_rollout"),
])
def test_bad_rollout_settings_name_the_field(override, field):
    with pytest.raises(ValueError, match=f"config.{field}="):
        load_config(None, [f"--config.rollout.{override}"])


def test_the_reference_is_refreshed_by_default_only_in_iterative_mode():
    online = load_config(None, ["--config.rollout.every=1"]).rollout
    iterative = load_config(None, ["--config.rollout.every=4"]).rollout
    assert not online.refreshes_reference and iterative.refreshes_reference
    forced = load_config(None, ["--config.rollout.every=4",
                                "--config.rollout.refresh_reference=false"]).rollout
    assert not forced.refreshes_reference


def test_resolve_fits_the_run_to_what_the_rollout_builds():
    base = ["--config.rollout.enabled=true", "--config.data.batch_size=4"]
    online = rollout.resolve(load_config(None, base))
    assert online.data.format == "pair" and online.data.rows == 4
    assert online.reference.mode == "model"  # the initial policy, as data files would have it
    iterative = rollout.resolve(load_config(None, base + ["--config.rollout.every=3"]))
    assert iterative.reference.mode == "precomputed" and not iterative.reference.cache_dir
    assert rollout.resolve(Config()) == Config()  # off: untouched
    with pytest.raises(ValueError, match="config.rollout.build='lists'.*dpo"):
        rollout.resolve(load_config(None, base + ["--config.rollout.build=lists"]))
    with pytest.raises(ValueError, match="config.data.max_responses=2"):
        rollout.resolve(load_config(None, base + [
            "--config.rollout.build=lists", "--config.loss.name=list_mle"]))
    with pytest.raises(ValueError, match="config.rollout.refresh_reference"):
        rollout.resolve(load_config(None, base + ["--config.loss.name=tdpo",
                                                  "--config.rollout.every=2"]))


# ----------------------------------------------------------------------------- rewards, groups


def test_module_function_reward_source():
    fn = rollout.reward_source(f"{__name__}:early_letters")
    np.testing.assert_array_equal(fn(["p", "q"], [" a b z", " f"]), [2.0, 0.0])
    with pytest.raises(ValueError, match="returned 1 rewards for 2"):
        rollout.reward_source(f"{__name__}:wrong_length")(["p", "q"], ["a", "b"])
    with pytest.raises(ValueError, match="config.rollout.reward=.*has no function 'nope'"):
        rollout.reward_source(f"{__name__}:nope")
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'"):
        rollout.reward_source("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="is not a directory"):
        rollout.reward_source("rm:/no/such/reward/model")
    task = rollout.reward_source("task")
    np.testing.assert_allclose(task(["sort: c a b ->"] * 2, [" a b c", " a c b"]), [1.0, 1 / 3])


def test_pairs_are_best_vs_worst_and_ties_are_dropped_and_counted():
    rewards = np.array([[0.2, 0.9, 0.1, 0.9],   # best: the first 0.9; worst: 0.1
                        [0.5, 0.5, 0.5, 0.5],   # a tie: no preference
                        [0.0, 0.0, 1.0, 0.0]])  # worst: the first 0.0
    responses = [["a", "b", "c", "d"], ["e", "f", "g", "h"], ["i", "j", "k", "l"]]
    records, ties = rollout.build_records(["p", "q", "r"], responses, rewards, "pairs")
    assert ties == 1
    assert records == [{"prompt": "p", "chosen": "b", "rejected": "c"},
                       {"prompt": "r", "chosen": "k", "rejected": "i"}]
    lists, ties = rollout.build_records(["p", "q", "r"], responses, rewards, "lists")
    assert ties == 1 and [r["prompt"] for r in lists] == ["p", "r"]
    assert lists[0]["responses"] == responses[0]
    np.testing.assert_allclose(lists[0]["scores"], rewards[0])
    # A list holds each distinct sample once; samples that are all one text are a tie.
    lists, ties = rollout.build_records(["p", "q"], [["a", "b", "a"], ["c", "c", "c"]],
                                        np.array([[1.0, 0.0, 1.0], [1.0, 0.5, 0.0]]), "lists")
    assert ties == 1 and lists == [{"prompt": "p", "responses": ["a", "b"],
                                    "scores": [1.0, 0.0]}]


def test_trees_share_leading_words_and_leave_out_what_a_tree_cannot_hold():
    samples = [[" a b c</s>", " a c b</s>", " a b", " a b c</s>", "</s>", " b c a d e"]]
    rewards = np.array([[1.0, 0.3, 0.6, 1.0, 0.0, 0.2]])
    (record,), ties = rollout.build_records(["p"], samples, rewards, "trees", eos="</s>",
                                            max_steps=4)
    # " a b" is a prefix of " a b c", "</s>" is empty, the last has 5 steps > 4, and the
    # repeated " a b c" is kept once.
    assert ties == 0 and record == {"prompt": "p", "responses": [
        {"steps": [" a", " b", " c"], "score": 1.0},
        {"steps": [" a", " c", " b"], "score": pytest.approx(0.3)}]}


def test_rounds_walk_the_prompts_once_per_pass():
    rounds = [rollout.round_prompts(10, 4, r, seed=1) for r in range(5)]  # 20 = two passes
    flat = [i for r in rounds for i in r]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new order each pass
    assert rollout.round_prompts(10, 4, 3, seed=1) == rounds[3]
    assert rollout.round_prompts(10, 4, 3, seed=2) != rounds[3]


def test_continuation_is_the_text_after_the_prompt_up_to_eos():
    run = build_run(Config())
    tok = run.tokenizer
    prompt = tok.encode("sort: c a b ->")
    answer = tok.encode(" a b c", add_special_tokens=False)
    assert sampler.continuation(tok, prompt, answer + [tok.eos_id, 7, 8]) == (
        " a b c", " a b c </s>")
    assert sampler.continuation(tok, prompt, answer) == (" a b c", " a b c")  # no EOS: cut
    text, record = sampler.continuation(tok, prompt, [tok.eos_id])  # an empty answer
    assert text == "" and tok.encode("sort: c a b ->" + record) == prompt + [tok.eos_id]


# ----------------------------------------------------------------------------- the iterator


def test_rounds_compile_once_and_the_state_restores_the_batches(tmp_path, compiles):  # noqa: F811
    config = rollout.resolve(load_config(None, [
        "--config.rollout.enabled=true", f"--config.rollout.reward={__name__}:early_letters",
        "--config.rollout.prompts_per_rollout=4", "--config.rollout.num_samples=3",
        "--config.rollout.max_new_tokens=6", "--config.data.batch_size=4",
        "--config.data.max_length=24", "--config.data.max_prompt_length=12"]))
    train_files, _ = inputs.data_files(config, str(tmp_path))
    config, run = loop.resolved_run(config, train_files)
    builder = inputs.group_builder(config, run.tokenizer, run.label_mapping)
    it = rollout.RolloutIterator(run, builder, train_files, str(tmp_path))
    params = run.initial_params()
    stats = [it.rollout(params, update) for update in range(3)]
    assert [s["rollout/round"] for s in stats] == [0, 1, 2]
    assert compiles("_generate") == 1  # one compilation for every round
    assert stats[0]["rollout/tokens"] > 0 and 0 < stats[0]["rollout/groups"] <= 4
    assert stats[0]["rollout/groups"] + stats[0]["rollout/ties"] == 4
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint holds
    again = rollout.RolloutIterator(run, builder, train_files, str(tmp_path))
    again.set_state(state)
    for _ in range(2):  # the same batches follow
        a, b = next(it), next(again)
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # The same round from the same params samples the same responses; another round differs.
    first = it.get_state()["samples"]
    it.rollout(params, 2)
    assert it.get_state()["samples"] == first
    it.rollout(params, 3)
    assert it.get_state()["samples"] != first


def test_iterative_rounds_give_the_held_out_records_their_reference(tmp_path):
    """With a refreshed reference each round computes the round-start policy's log-probs of the
    held-out pairs: evaluated with those params, policy = reference (loss log 2, margins 0),
    and the table survives the checkpointed state."""
    config = rollout.resolve(load_config(None, [
        "--config.rollout.enabled=true", f"--config.rollout.reward={__name__}:early_letters",
        "--config.rollout.every=3", "--config.rollout.prompts_per_rollout=4",
        "--config.rollout.num_samples=3", "--config.rollout.max_new_tokens=6",
        "--config.data.batch_size=4", "--config.data.max_length=24",
        "--config.data.max_prompt_length=12", "--config.train.eval_batches=2"]))
    assert config.reference.mode == "precomputed"
    train_files, eval_files = inputs.data_files(config, str(tmp_path))
    config, run = loop.resolved_run(config, train_files)
    builder = inputs.group_builder(config, run.tokenizer, run.label_mapping)
    it = rollout.RolloutIterator(run, builder, train_files, str(tmp_path))
    it.track_eval(inputs.source(config, eval_files), builder)
    assert it.eval_records() == []  # no round yet
    params = run.initial_params()
    it.rollout(params, 0)
    records = it.eval_records()
    assert len(records) > 8 and all("ref_chosen_logps" in r.data for r in records)
    evaluator = loop._Evaluator(run, eval_files, builder, True, records=it.eval_records)
    metrics = evaluator(params, None)
    assert metrics["eval/groups"] == 8  # eval_batches=2 batches of 4
    np.testing.assert_allclose(metrics["eval/loss"], np.log(2.0), rtol=1e-5)
    np.testing.assert_allclose(metrics["eval/rewards/margins"], 0.0, atol=1e-5)
    again = rollout.RolloutIterator(run, builder, train_files, str(tmp_path))
    again.track_eval(inputs.source(config, eval_files), builder)
    again.set_state(json.loads(json.dumps(it.get_state())))
    assert [r.data for r in again.eval_records()] == [r.data for r in records]
    # `jaxpo eval` of such a run says where its metrics are and how to evaluate otherwise
    with pytest.raises(ValueError, match="reference.mode=model"):
        loop.evaluate(config, str(tmp_path))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_online_dpo_improves_the_true_reward(tmp_path):
    sft_dir, online_dir = str(tmp_path / "sft"), str(tmp_path / "online")
    loop.train(load_config(os.path.join(REPO_ROOT, "configs", "sft_tiny.py")), sft_dir,
               progress=False)
    config = load_config(os.path.join(REPO_ROOT, "configs", "online_dpo_tiny.py"), [
        f"--config.model.init_from={sft_dir}", "--config.train.steps=60"])
    summary = loop.train(config, online_dir, progress=False)
    assert summary["step"] == 60
    prompts = [r["prompt"] for r in synthetic.records("pair", 100, seed=10_000)]
    run = build_run(config)
    before, _, _ = loop.load_params(build_run(load_config(
        os.path.join(REPO_ROOT, "configs", "sft_tiny.py"))), sft_dir)
    after, _, _ = loop.load_params(run, online_dir)
    scores = [sampler.greedy_rewards(run, p, prompts, rollout.task_reward,
                                     max_new_tokens=8).mean() for p in (before, after)]
    assert scores[1] > scores[0] + 0.05, scores
    sampled = [r["rollout/reward_mean"] for r in _jsonl(online_dir, "metrics.jsonl")
               if "rollout/reward_mean" in r]
    assert len(sampled) == 60 and np.mean(sampled[-10:]) > np.mean(sampled[:10])
    logged = _jsonl(online_dir, "rollouts", "samples.jsonl")
    assert {r["step"] for r in logged} == {50, 60}  # at each evaluation
    assert all(len(r["responses"]) == len(r["rewards"]) == 4 for r in logged)


def _jsonl(*path: str) -> list[dict]:
    with open(os.path.join(*path), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


STEPS = 10
SCRIPT = """
import json, sys
import jax, numpy as np
from flax import nnx
from jaxpo.config import Config, replace
from jaxpo.train import loop
workdir = sys.argv[1]
cfg = replace(Config(), {
    "loss": {"name": "dpo", "beta": 0.1},
    "optim": {"learning_rate": 1e-3, "warmup_steps": 2},
    "data": {"max_length": 24, "max_prompt_length": 12, "batch_size": 4},
    "rollout": {"enabled": True, "every": EVERY, "prompts_per_rollout": 4, "num_samples": 3,
                "max_new_tokens": 6, "reward": "test_rollout:early_letters"},
    "train": {"steps": STEPS, "checkpoint_every": 2, "eval_every": 5, "log_every": 1,
              "eval_batches": 1, "seed": 3},
})
summary = loop.train(cfg, workdir, progress=False)
if not summary["preempted"]:
    model, step = loop.load_policy(cfg, workdir)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    np.savez(workdir + "/final.npz", **{jax.tree_util.keystr(p): np.asarray(x)
                                        for p, x in leaves})
print(json.dumps({k: summary[k] for k in ("step", "preempted", "resumed_from")}))
""".replace("STEPS", str(STEPS))


def _start(workdir: str, cache: str, every: int) -> subprocess.Popen:
    env = snippet_env(1, {"JAX_COMPILATION_CACHE_DIR": cache,
                          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    env["PYTHONPATH"] = os.pathsep.join((TESTS, env["PYTHONPATH"]))
    return subprocess.Popen([sys.executable, "-c", SCRIPT.replace("EVERY", str(every)),
                             workdir], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 3], ids=["online", "iterative"])
def test_sigkill_resume_of_a_rollout_run_is_bitwise_exact(tmp_path, every):
    cache = str(tmp_path / "jax_cache")
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    reference = _start(straight, cache, every)
    proc = _start(interrupted, cache, every)
    _wait_for(lambda: _checkpoints(interrupted), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _checkpoints(interrupted)[-1]
    assert killed_at < STEPS
    summary = _finish(_start(interrupted, cache, every))
    assert summary["resumed_from"] == killed_at and summary["step"] == STEPS
    assert _finish(reference)["step"] == STEPS
    a, b = (np.load(os.path.join(d, "final.npz")) for d in (straight, interrupted))
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 5
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert _logged_steps(interrupted) == _logged_steps(straight) == list(range(1, STEPS + 1))

    def sampled(workdir):  # the rounds' rewards, as logged (each round once after a resume)
        return [(r["step"], r["rollout/reward_mean"]) for r in _jsonl(workdir, "metrics.jsonl")
                if "rollout/round" in r]

    assert sampled(interrupted) == sampled(straight)
    assert len(sampled(straight)) == -(-STEPS // every)

    def evaluated(workdir):  # held-out metrics (iterative: against the round's reference)
        return [(r["step"], r["eval/loss"]) for r in _jsonl(workdir, "metrics.jsonl")
                if "eval/loss" in r]

    assert [s for s, _ in evaluated(straight)] == [5, 10]
    assert evaluated(interrupted)[-1] == evaluated(straight)[-1]


@pytest.mark.slow
def test_a_jaxpo_reward_model_scores_the_samples(tmp_path):
    rm_dir, policy_dir = str(tmp_path / "rm"), str(tmp_path / "policy")
    loop.train(load_config(os.path.join(REPO_ROOT, "configs", "rm_tiny.py"),
                           ["--config.train.steps=10", "--config.train.eval_every=0"]),
               rm_dir, progress=False)
    config = load_config(None, [
        "--config.rollout.enabled=true", f"--config.rollout.reward=rm:{rm_dir}",
        "--config.rollout.prompts_per_rollout=4", "--config.rollout.num_samples=3",
        "--config.rollout.max_new_tokens=6", "--config.data.batch_size=4",
        "--config.data.max_length=24", "--config.data.max_prompt_length=12",
        "--config.train.steps=2", "--config.train.eval_batches=1"])
    assert loop.train(config, policy_dir, progress=False)["step"] == 2
    (logged, *_) = _jsonl(policy_dir, "rollouts", "samples.jsonl")
    score = reward_model.load_scorer(rm_dir)  # (it appends the EOS a sample ended with)
    answered = [i for i, r in enumerate(logged["responses"]) if r]
    expected = score([logged["prompt"]] * len(answered),
                     [logged["responses"][i] for i in answered])
    np.testing.assert_allclose([logged["rewards"][i] for i in answered], expected, rtol=1e-5,
                               atol=1e-6)
    assert len(set(logged["rewards"])) > 1  # a learned score, not a constant


SHARDED = """
import json
import jax
from jaxpo.config import Config, replace
from jaxpo.train import loop
cfg = replace(Config(), {
    "mesh": {"data": 2, "fsdp": 2},
    "data": {"max_length": 24, "max_prompt_length": 12, "batch_size": 4},
    "rollout": {"enabled": True, "prompts_per_rollout": 4, "num_samples": 3,
                "max_new_tokens": 6, "reward": "test_rollout:early_letters"},
    "train": {"steps": 2, "eval_batches": 1},
})
summary = loop.train(cfg, "WORKDIR", progress=False)
rows = [json.loads(x) for x in open("WORKDIR/metrics.jsonl")]
print(json.dumps({"step": summary["step"], "devices": jax.device_count(),
                  "groups": [r["rollout/groups"] for r in rows if "rollout/groups" in r]}))
"""


@pytest.mark.slow
def test_sampling_and_training_share_a_four_device_mesh(tmp_path):
    out = run_snippet(SHARDED.replace("WORKDIR", str(tmp_path)), devices=4, timeout=400,
                      env={"PYTHONPATH": os.pathsep.join((TESTS, REPO_ROOT))})
    assert out["step"] == 2 and out["devices"] == 4
    assert len(out["groups"]) == 2 and all(g > 0 for g in out["groups"])
