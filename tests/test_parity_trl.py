"""jaxpo's DPO numbers against TRL's, recorded on the same model files and records.

``scripts/trl_parity.py`` (reference venv) built ``tests/fixtures/parity/``: a tiny random Llama
checkpoint (``model/``, with a Llama-3-style tokenizer), a second one (``ref_model/``), records of
the three pair forms, and ``dpo_expected.json`` with what TRL's ``DPOTrainer`` computes on them
in fp32 (β = 0.1, ``max_length`` = 48, ``keep_start``): the token ids after its dataset
processing and collator truncation, each record's summed completion log-probs under both models,
and the step-0 eval metrics with the reference = the policy and with ``ref_model/``.

Here jaxpo recomputes them from the files alone (no torch): ``jaxpo.train.loop.evaluate`` for the
same-reference metrics, and its eval step with ``reference.mode=precomputed`` fed by the records'
``ref_chosen_logps`` / ``ref_rejected_logps`` (TRL's column names) for the other reference.

Run ``python3 tests/test_parity_trl.py`` to print jaxpo's numbers as JSON.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "parity")
FORMS = ("explicit", "conversational", "implicit")
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
           "rewards/accuracies", "logps/chosen", "logps/rejected")


def _expected() -> dict:
    with open(os.path.join(FIXTURES, "dpo_expected.json"), encoding="utf-8") as f:
        return json.load(f)


def _config(expected: dict, files: str, mode: str = "model", batch_size: int = 8):
    from jaxpo.config import Config, apply_overrides

    n = expected["max_length"]
    return apply_overrides(Config(), [
        f"--config.model.path={os.path.join(FIXTURES, 'model')}",
        f"--config.data.train_files={files}", f"--config.data.eval_files={files}",
        "--config.data.format=pair", f"--config.data.max_length={n}",
        f"--config.data.max_prompt_length={n - 1}",
        f"--config.data.truncation_mode={expected['truncation_mode']}",
        f"--config.data.batch_size={batch_size}", "--config.data.shuffle=false",
        "--config.loss.name=dpo", f"--config.loss.beta={expected['beta']}",
        f"--config.reference.mode={mode}",
    ] + (["--config.reference.cache_dir=unused"] if mode == "precomputed" else []))


def _paths(form: str) -> tuple[str, str]:
    return (os.path.join(FIXTURES, f"pairs_{form}.jsonl"),
            os.path.join(FIXTURES, f"pairs_{form}_ref.jsonl"))


def jaxpo_numbers() -> dict:
    """jaxpo's ids, per-record policy log-probs and eval metrics for every form."""
    import jax

    from jaxpo.data.sources import RecordSource
    from jaxpo.train import inputs, loop
    from jaxpo.train import step as step_lib
    from jaxpo.train.loss_inputs import BATCH_KEYS, sequence_logps
    from jaxpo.train.setup import build_run

    expected = _expected()
    first, first_ref = _paths(FORMS[0])
    # Shapes and steps depend on the config, not on the files: one run per mode and batch size.
    runs = {(mode, bs): build_run(_config(expected, first, mode, bs))
            for mode in ("model", "precomputed") for bs in (8, 2)}
    run = runs["model", 8]
    params = run.initial_params()
    logps_fn = jax.jit(lambda p, b: sequence_logps(
        run.graphdef, p, b, num_nodes=run.num_nodes,
        chunk_size=run.config.model.logprob_chunk_size).logps)
    out = {form: {} for form in FORMS}
    for form in FORMS:
        path, ref_path = _paths(form)
        config = _config(expected, path)
        builder = inputs.group_builder(config, run.tokenizer, run.label_mapping)
        logps = {}
        for batch in inputs.eval_iterator(config, (path,), builder):
            values = np.asarray(logps_fn(params, {k: batch[k] for k in BATCH_KEYS}))
            for g in np.flatnonzero(batch["group_mask"]):
                logps[int(batch["group_id"][g])] = values[g, :2].tolist()
        ids = {}
        for raw in RecordSource([path]):
            group = builder(raw)
            if group is not None:
                tok = [np.asarray(t).tolist() for t in group.node_tokens]
                ids[group.id] = [tok[0]] + [[t for n in r for t in tok[n]]
                                            for r in group.responses]
        order = sorted(ids)
        out[form]["ids"] = [ids[i] for i in order]
        out[form]["policy_logps"] = {"chosen": [logps[i][0] for i in order],
                                     "rejected": [logps[i][1] for i in order]}
        # reference.mode=precomputed reads the records' ref_chosen_logps / ref_rejected_logps.
        for bs, suffix in ((8, ""), (2, "_batch2")):
            for mode, name, files, ref in (("model", "same_reference", path, params),
                                           ("precomputed", "ref_model", ref_path, None)):
                r = runs[mode, bs]
                m = loop._Evaluator(r, (files,), builder, mode == "precomputed")(params, ref)
                out[form][name + suffix] = {k: m[f"eval/{k}"] for k in METRICS}
                out[form][f"groups_{name}{suffix}"] = m["eval/groups"]
    # The public entry point gives the same numbers.
    same = loop.evaluate(_config(expected, first), untrained=True)
    out[FORMS[0]]["evaluate"] = {k: same[f"eval/{k}"] for k in METRICS}
    # The train step's metrics (computed before its update) on the explicit-prompt records.
    ref_run = runs["precomputed", 8]
    config = _config(expected, first_ref, "precomputed")
    (batch,) = list(inputs.eval_iterator(config, (first_ref,), inputs.group_builder(
        config, ref_run.tokenizer, ref_run.label_mapping), with_ref_logps=True))
    keys = BATCH_KEYS + ("ref_logps",)
    train_step = ref_run.train_step()
    _, metrics = train_step(ref_run.new_state(params), None,
                            step_lib.stack({k: batch[k] for k in keys}))
    out[FORMS[0]]["train_step_ref_model"] = {k: float(metrics[k]) for k in METRICS}
    return out


@pytest.fixture(scope="module")
def numbers():
    return jaxpo_numbers()


@pytest.mark.parametrize("form", FORMS)
def test_token_ids_match_trl(numbers, form):
    """Prompt and completion ids after TRL's processing and its max_length truncation."""
    trl = _expected()["forms"][form]["records"]
    assert numbers[form]["ids"] == [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]]
                                    for r in trl]
    assert any(r["chosen_untruncated"] > len(r["chosen_ids"]) for r in trl)  # a cut happened


@pytest.mark.parametrize("form", FORMS)
def test_policy_logps_match_trl(numbers, form):
    trl = _expected()["forms"][form]["policy_logps"]
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(numbers[form]["policy_logps"][side], trl[side],
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reference", ["same_reference", "ref_model", "same_reference_batch2",
                                       "ref_model_batch2"])
def test_dpo_metrics_match_trl(numbers, form, reference):
    """Eval metrics in one batch and in batches of 2 (TRL: loss over records, the other
    metrics the mean of batch means)."""
    trl = _expected()["forms"][form][reference]
    n = len(_expected()["forms"][form]["records"])
    assert numbers[form][f"groups_{reference}"] == n
    for k in METRICS:
        assert numbers[form][reference][k] == pytest.approx(trl[k], rel=1e-5, abs=1e-5), k
    if reference.startswith("same_reference"):  # rewards 0, loss log 2, no win: accuracy 0
        assert trl["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
        assert numbers[form][reference]["rewards/accuracies"] == 0.0
    else:  # the other reference makes the numbers non-trivial
        assert abs(trl["rewards/margins"]) > 1e-3 and 0 < trl["rewards/accuracies"]


def test_evaluate_entry_point(numbers):
    trl = _expected()["forms"][FORMS[0]]["same_reference"]
    for k in METRICS:
        assert numbers[FORMS[0]]["evaluate"][k] == pytest.approx(trl[k], rel=1e-5, abs=1e-5), k


def test_train_step_metrics_match_trl(numbers):
    """The train step logs the same loss and metrics (before its update) as the eval step."""
    trl = _expected()["forms"][FORMS[0]]["ref_model"]
    for k in METRICS:
        assert numbers[FORMS[0]]["train_step_ref_model"][k] == pytest.approx(
            trl[k], rel=1e-5, abs=1e-5), k


def test_prompt_of_max_length_is_dropped_as_trl_does():
    """TRL drops a record whose prompt alone has ``max_length`` tokens or more; so does the
    group builder when no prompt limit applies (the config's ``max_prompt_length``, always
    below ``max_length``, would cut the prompt and keep the record instead)."""
    from jaxpo.config import DataConfig
    from jaxpo.data.groups import GroupBuilder
    from jaxpo.data.sources import RecordSource
    from jaxpo.data.tokenize import Tokenizer

    expected = _expected()
    source = RecordSource([os.path.join(FIXTURES, "pairs_dropped.jsonl")])
    assert len(source) == expected["dropped"] >= 1
    tok = Tokenizer.from_dir(os.path.join(FIXTURES, "model"))
    builder = GroupBuilder(tok, DataConfig(format="pair", max_length=expected["max_length"]))
    assert [builder(raw) for raw in source] == [None] * len(source)
    assert builder.counters["dropped/prompt_too_long"] == len(source)
    long_prompt = GroupBuilder(tok, DataConfig(format="pair", max_length=10**6))(source[0])
    assert len(long_prompt.node_tokens[0]) >= expected["max_length"]


def test_metrics_from_independent_formula():
    """TRL's recorded metrics follow from its recorded per-record log-probs (numpy)."""
    beta = _expected()["beta"]
    for form in FORMS:
        trl = _expected()["forms"][form]
        pc, pr = (np.asarray(trl["policy_logps"][s], np.float64) for s in ("chosen", "rejected"))
        rc, rr = (np.asarray(trl["ref_model_logps"][s], np.float64)
                  for s in ("chosen", "rejected"))
        ch, rj = beta * (pc - rc), beta * (pr - rr)
        want = {"loss": np.mean(np.logaddexp(0.0, -(ch - rj))), "rewards/chosen": ch.mean(),
                "rewards/rejected": rj.mean(), "rewards/margins": (ch - rj).mean(),
                "rewards/accuracies": (ch > rj).mean(), "logps/chosen": pc.mean(),
                "logps/rejected": pr.mean()}
        for k, v in want.items():
            assert trl["ref_model"][k] == pytest.approx(v, rel=1e-5, abs=1e-5), (form, k)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(HERE))
    sys.stdout.write(json.dumps(jaxpo_numbers()) + "\n")
