"""jaxpo's reward-model numbers against TRL's, recorded on the same model files and records.

``scripts/trl_reward_parity.py`` (reference venv) built ``tests/fixtures/parity_rm/``: a tiny
random ``LlamaForSequenceClassification`` whose Llama-3-style tokenizer has no padding token
(TRL then pads with the EOS, and transformers reads each row at its last token before it),
pairs in four forms (explicit prompt, the same with a per-record ``margin`` column,
conversational, implicit prompt), and ``rm_expected.json``: TRL's token ids of every chosen and
rejected sequence, each one's reward from the model's forward pass, and
``RewardTrainer.evaluate``'s metrics with all records in one batch (fp32), and those of the
explicit pairs with ``center_rewards_coefficient``.

Here jaxpo recomputes them from the files alone (no torch): the ids from its group builder,
the rewards from ``jaxpo score``'s scorer on the model directory, and the metrics from
``jaxpo.train.loop.evaluate``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "parity_rm")
MODEL = os.path.join(FIXTURES, "model")
FORMS = ("explicit", "margin", "conversational", "implicit")
METRICS = ("loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward")


def _expected(form: str) -> dict:
    with open(os.path.join(FIXTURES, "rm_expected.json"), encoding="utf-8") as f:
        return json.load(f)["forms"][form]


def _records(form: str) -> list[dict]:
    with open(os.path.join(FIXTURES, f"pairs_{form}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _config(form: str, *extra: str):
    from jaxpo.config import Config, apply_overrides

    path = os.path.join(FIXTURES, f"pairs_{form}.jsonl")
    return apply_overrides(Config(), [
        f"--config.model.path={MODEL}", "--config.model.head=reward",
        f"--config.data.train_files={path}", f"--config.data.eval_files={path}",
        "--config.data.format=pair", "--config.data.max_length=128",
        "--config.data.max_prompt_length=96", "--config.data.batch_size=8",
        "--config.data.shuffle=false", "--config.loss.name=bradley_terry",
        "--config.reference.mode=none", *extra])


@pytest.mark.parametrize("form", FORMS)
def test_token_ids_match_trl(form):
    """TRL's chosen/rejected ids (prompt + response + EOS, or the chat template's rendering)
    are jaxpo's prompt tokens followed by each response's."""
    from jaxpo.data.sources import RecordSource
    from jaxpo.data.tokenize import Tokenizer
    from jaxpo.train import inputs

    config = _config(form)
    builder = inputs.group_builder(config, Tokenizer.from_dir(MODEL), "minmax")
    got = []
    for raw in RecordSource([os.path.join(FIXTURES, f"pairs_{form}.jsonl")]):
        group = builder(raw)
        prompt = np.asarray(group.node_tokens[0]).tolist()
        got.append({"chosen_ids": prompt + group.response_tokens(0).tolist(),
                    "rejected_ids": prompt + group.response_tokens(1).tolist()})
    assert got == _expected(form)["ids"]


@pytest.fixture(scope="module")
def scorer():
    from jaxpo.train.reward_model import load_scorer

    return load_scorer(MODEL)


@pytest.mark.parametrize("form", FORMS[:3])  # the scorer takes explicit prompts
def test_rewards_match_transformers(scorer, form):
    """``jaxpo score``'s rewards are the transformers model's on TRL's sequences, read where it
    reads them (the EOS is the padding token here, so the token before the closing EOS)."""
    records, want = _records(form), _expected(form)["rewards"]
    prompts = [r["prompt"] for r in records]
    for side in ("chosen", "rejected"):
        got = scorer(prompts, [r[side] for r in records])
        np.testing.assert_allclose(got, want[side], rtol=1e-4, atol=1e-5, err_msg=side)


@pytest.mark.parametrize("form", FORMS)
def test_eval_metrics_match_trl(form):
    from jaxpo.train import loop

    got = loop.evaluate(_config(form), untrained=True)
    want = _expected(form)["metrics"]
    assert got["eval/groups"] == len(_records(form))
    for key in METRICS:
        np.testing.assert_allclose(got[f"eval/{key}"], want[key], rtol=1e-4, atol=1e-5,
                                   err_msg=key)


def test_centered_loss_matches_trl():
    """TRL's center_rewards_coefficient: + c·mean((r_c + r_r)²), here
    loss.kwargs=center_rewards_coefficient=c."""
    from jaxpo.train import loop

    with open(os.path.join(FIXTURES, "rm_expected.json"), encoding="utf-8") as f:
        want = json.load(f)["centered"]
    c = want["center_rewards_coefficient"]
    got = loop.evaluate(_config("explicit", f"--config.loss.kwargs=center_rewards_coefficient={c}"),
                        untrained=True)
    for key in METRICS:
        np.testing.assert_allclose(got[f"eval/{key}"], want[key], rtol=1e-4, atol=1e-5,
                                   err_msg=key)
    assert want["loss"] > _expected("explicit")["metrics"]["loss"] + 0.01  # the term counts
