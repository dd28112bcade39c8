"""End to end on the tiny model, for each data kind: train a few steps on the bundled synthetic
task, resume from the checkpoint, evaluate, and export a Hugging Face checkpoint that loads back
to the same logits."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpo.config import Config, replace
from jaxpo.models.hf_io import export_hf, load_hf
from jaxpo.train import loop

# kind -> (loss, K, M, layout)
KINDS = {
    "pair": ("dpo", 2, 1, "share_prefix"),
    "list": ("lipo_lambda", 4, 1, "packed"),
    "tree": ("tpo", 4, 5, "share_prefix"),
    "unpaired": ("kto", 1, 1, "padded"),
}


def _config(kind: str, steps: int) -> Config:
    loss, k, m, layout = KINDS[kind]
    return replace(Config(), {
        "loss": {"name": loss},
        "optim": {"learning_rate": 1e-3},
        "data": {"format": kind, "layout": layout, "max_length": 64, "max_prompt_length": 24,
                 "batch_size": 4, "max_responses": k, "max_steps": m},
        "train": {"steps": steps, "checkpoint_every": 2, "eval_batches": 1, "log_every": 1},
    })


def _run(kind: str, workdir: str) -> None:
    with pytest.raises(ValueError, match="no checkpoint there"):  # never silently untrained
        loop.evaluate(_config(kind, 2), workdir)
    untrained = loop.evaluate(_config(kind, 2), workdir, untrained=True)
    assert untrained["step"] == 0 and np.isfinite(untrained["eval/loss"])
    if kind == "pair":  # policy = reference: DPO's loss is log 2
        np.testing.assert_allclose(untrained["eval/loss"], np.log(2.0), rtol=1e-5)
    first = loop.train(_config(kind, 2), workdir, progress=False)
    assert first["step"] == 2 and first["resumed_from"] is None and not first["preempted"]
    assert np.isfinite(first["final"]["loss"]) and first["final"]["grad_norm"] > 0

    # Resume: the same workdir with more steps continues from the step-2 checkpoint.
    second = loop.train(_config(kind, 3), workdir, progress=False)
    assert second["resumed_from"] == 2 and second["step"] == 3
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [1, 2, 3]
    evals = [r for r in records if "eval/loss" in r]
    assert evals and np.isfinite(evals[-1]["eval/loss"])
    expected = {"loss", "grad_norm", "learning_rate", "tokens_per_sec", "skipped_steps",
                "skipped_records", "rewards/chosen", "logps/chosen"}
    assert expected <= set(records[-2 if "eval/loss" in records[-1] else -1])
    if KINDS[kind][1] > 2:
        assert "ranking/ndcg" in records[0]

    # Evaluate the newest checkpoint (step 3).
    result = loop.evaluate(_config(kind, 3), workdir)
    assert result["step"] == 3 and np.isfinite(result["eval/loss"]) and result["eval/groups"] > 0

    # Export the policy and load it back.
    model, step = loop.load_policy(_config(kind, 3), workdir)
    assert step == 3
    out = os.path.join(workdir, "hf")
    export_hf(model, out)
    again = load_hf(out)
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % model.config.vocab_size
    np.testing.assert_allclose(np.asarray(again(tokens)), np.asarray(model(tokens)), atol=1e-5)
    assert os.listdir(os.path.join(workdir, "tensorboard"))


@pytest.mark.slow
def test_pair_train_resume_eval_export(tmp_path):
    _run("pair", str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["list", "tree", "unpaired"])
def test_kind_train_resume_eval_export(kind, tmp_path):
    _run(kind, str(tmp_path))


def test_objective_needing_a_reference_refuses_mode_none(tmp_path):
    config = replace(Config(), {"loss": {"name": "dpo"}, "reference": {"mode": "none"}})
    with pytest.raises(ValueError, match="needs a reference.*config.reference.mode='none'"):
        loop.train(config, str(tmp_path))
