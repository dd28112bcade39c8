"""KTO's reference point z0 as TRL estimates it: each prompt of a batch with the previous
example's completion, mean policy − reference log-ratio, clamped at 0, without gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpo.config import Config, replace
from jaxpo.data.batcher import BatchBuilder, BatchConfig
from jaxpo.data.layout import group_units
from jaxpo.data.mismatched import KL_KEYS, mismatched_pairs
from jaxpo.data.sources import RecordSource
from jaxpo.train import inputs, setup
from jaxpo.train.loop import resolved_run
from jaxpo.train.loss_inputs import BATCH_KEYS, batch_inputs


def _kto_config(**loss):
    return replace(Config(), {
        "loss": {"name": "kto", **loss},
        "data": {"format": "unpaired", "max_length": 40, "max_prompt_length": 20,
                 "batch_size": 4, "max_responses": 1, "shuffle": False},
    })


def _causal_logp(model, prompt, completion) -> float:
    """log π(completion | prompt) from the full causal logits (no packing)."""
    ids = np.concatenate([prompt, completion]).astype(np.int32)[None]
    logits = np.asarray(model(jnp.asarray(ids)), np.float64)[0]  # [T, V]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    p = len(prompt)
    return float(sum(logp[p - 1 + t, completion[t]] for t in range(len(completion))))


def test_mismatched_pairs_pair_each_prompt_with_the_previous_completion(tmp_path):
    config = _kto_config()
    train_files, _ = inputs.data_files(config, str(tmp_path))
    config, run = resolved_run(config, train_files)
    builder = inputs.group_builder(config, run.tokenizer, run.label_mapping, run.objective.kinds)
    it = inputs.train_iterator(config, train_files, builder, mismatched_pairs=True)
    batch = next(it)
    assert set(KL_KEYS) <= set(batch)
    for key in KL_KEYS:  # the batch's own shapes: the step compiles once
        assert batch[key].shape == batch[key.removeprefix("kl_")].shape
    assert batch["kl_group_mask"].sum() == batch["group_mask"].sum() == 4
    assert run.mismatched_pairs and not resolved_run(_kto_config(kto_kl="matched"),
                                                     train_files)[1].mismatched_pairs


@pytest.mark.slow
def test_z0_equals_the_causal_mean_log_ratio_of_mismatched_pairs(tmp_path):
    config = _kto_config()
    train_files, _ = inputs.data_files(config, str(tmp_path))
    config, run = resolved_run(config, train_files)
    builder = inputs.group_builder(config, run.tokenizer, run.label_mapping, run.objective.kinds)
    groups = []
    for raw in RecordSource(list(train_files)):
        group = builder(raw)
        if group is not None:
            groups.append(group)
        if len(groups) == 4:
            break
    cfg = BatchConfig.from_data_config(config.data)
    b = BatchBuilder(cfg)
    for g in groups:
        assert b.add(g, group_units(g, cfg.layout))
    batch = b.finish() | mismatched_pairs(groups, cfg, 0, config.data.max_length)
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k in BATCH_KEYS + KL_KEYS}

    params = run.initial_params()
    # A reference that differs from the policy, so that z0 is not trivially 0.
    key = jax.random.key(1)
    ref = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(key, x.shape, x.dtype), params)
    got = batch_inputs(run.spec.logp, run.objective, params, ref, batch).kto_kl

    policy_model = nnx.merge(run.graphdef, params)
    ref_model = nnx.merge(run.graphdef, ref)
    diffs = []
    for i, g in enumerate(groups):
        prompt = np.asarray(g.node_tokens[0])
        completion = groups[i - 1].response_tokens(0)[:config.data.max_length - len(prompt)]
        diffs.append(_causal_logp(policy_model, prompt, completion)
                     - _causal_logp(ref_model, prompt, completion))
    want = max(float(np.mean(diffs)), 0.0)
    assert want > 0 or float(got) == 0.0
    np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-5)


def test_mismatched_needs_the_reference_model():
    config = replace(_kto_config(), {"reference": {"mode": "precomputed"}})
    with pytest.raises(ValueError, match="config.loss.kto_kl='mismatched'.*reference.mode"):
        setup.check(config, setup.build_objective(config)[0])
    config = replace(config, {"loss": {"kto_kl": "matched"}})
    setup.check(config, setup.build_objective(config)[0])
