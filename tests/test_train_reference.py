"""Precomputed reference log-probs: the cache holds each record's reference log-probs by record
id, training from it equals training with the in-step reference model, and a stale cache (other
params, length settings or data) is an error that says what changed."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpo.config import Config, replace
from jaxpo.data.sources import RecordSource
from jaxpo.tasks import synthetic
from jaxpo.train import inputs, loop
from jaxpo.train import reference as ref_lib
from jaxpo.train.setup import build_run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    return synthetic.write_task(str(out), "pair", num_train=12, num_eval=4, seed=1)


def _config(files, cache_dir, mode="precomputed", **data):
    return replace(Config(), {
        "loss": {"name": "dpo"}, "optim": {"learning_rate": 1e-3, "name": "sgd", "b1": 0.0},
        "reference": {"mode": mode, "cache_dir": cache_dir},
        "data": {"train_files": (files["train"],), "eval_files": (files["eval"],),
                 "max_length": 48, "max_prompt_length": 24, "batch_size": 4, "shuffle": False,
                 **data},
        "train": {"steps": 1, "eval_batches": 1, "checkpoint_every": 1},
    })


def test_cache_holds_reference_logps_by_record_id(files, tmp_path):
    cache = str(tmp_path / "ref")
    config = _config(files, cache)
    info = loop.precompute_reference(config, cache)
    assert info["records"] == {"train": 12, "eval": 4}
    with np.load(os.path.join(cache, ref_lib.CACHE_FILE)) as data:
        table = data["train"]
    assert table.shape == (12, 2) and np.isfinite(table).all() and (table < 0).all()

    # Independent: the untrained model's causal forward on prompt + response, per record.
    run = build_run(config)
    graphdef, params = run.graphdef, run.initial_params()
    forward = jax.jit(lambda p, x: jax.nn.log_softmax(nnx.merge(graphdef, p)(x), -1))
    builder = inputs.group_builder(config, run.tokenizer, run.label_mapping)
    source = RecordSource([files["train"]])
    for record_id in (0, 5, 11):
        group = builder(source[record_id])
        assert group.id == record_id
        prompt = group.node_tokens[0]
        for k in range(2):
            response = group.response_tokens(k)
            seq = np.zeros((1, 48), np.int32)  # one padded shape: one compilation
            seq[0, :len(prompt) + len(response)] = np.concatenate([prompt, response])
            logp = np.asarray(forward(params, jnp.asarray(seq))[0], np.float64)
            expected = sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(response))
            np.testing.assert_allclose(table[record_id, k], expected, rtol=1e-5)


@pytest.mark.slow
def test_precomputed_training_equals_in_step_reference(files, tmp_path):
    cache = str(tmp_path / "ref")
    loop.precompute_reference(_config(files, cache), cache)
    results = {}
    for mode in ("precomputed", "model"):
        workdir = str(tmp_path / mode)
        summary = loop.train(_config(files, cache, mode), workdir, progress=False)
        model, _ = loop.load_policy(_config(files, cache, mode), workdir)
        results[mode] = (summary["final"], jax.tree.leaves(nnx.state(model, nnx.Param)))
    for mode, (final, _) in results.items():
        np.testing.assert_allclose(final["loss"], np.log(2.0), rtol=1e-5, err_msg=mode)
    for a, b in zip(results["precomputed"][1], results["model"][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_a_cached_reference_run_loads_the_initial_model_once(files, tmp_path, monkeypatch):
    """The cache key fingerprints the initial params; a fresh start trains from the same
    arrays instead of reading the checkpoint a second time."""
    from jaxpo.train.setup import Run

    cache = str(tmp_path / "ref")
    loop.precompute_reference(_config(files, cache), cache)
    loads = []
    original = Run.initial_params
    monkeypatch.setattr(Run, "initial_params", lambda self: loads.append(1) or original(self))
    summary = loop.train(_config(files, cache), str(tmp_path / "run"), progress=False)
    assert summary["step"] == 1 and len(loads) == 1
    np.testing.assert_allclose(summary["final"]["loss"], np.log(2.0), rtol=1e-5)


def test_stale_or_missing_cache_is_an_error(tmp_path):
    files = synthetic.write_task(str(tmp_path / "data"), "pair", num_train=12, num_eval=4, seed=1)
    cache = str(tmp_path / "ref")
    with pytest.raises(FileNotFoundError, match="precompute-ref"):
        loop.train(_config(files, cache), str(tmp_path / "a"), progress=False)
    loop.precompute_reference(_config(files, cache), cache)
    # Other length settings.
    with pytest.raises(ValueError, match="stale.*length"):
        loop.train(_config(files, cache, max_length=40), str(tmp_path / "b"), progress=False)
    # Other params (another seed initialises another model).
    other = replace(_config(files, cache), {"train": {"seed": 7}})
    with pytest.raises(ValueError, match="stale.*params"):
        loop.train(other, str(tmp_path / "c"), progress=False)
    # Edited data.
    with open(files["eval"], "a") as f:
        f.write(json.dumps({"prompt": "sort: a b ->", "chosen": " a b", "rejected": " b a"})
                + "\n")
    with pytest.raises(ValueError, match="stale.*files"):
        loop.train(_config(files, cache), str(tmp_path / "d"), progress=False)
