"""The train step on one device: loss and gradients against a plain causal forward, the frozen
reference, precomputed and reference-free modes, non-finite skipping, and clear refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpo import losses
from jaxpo.models.config import get_preset
from jaxpo.models.transformer import Transformer
from jaxpo.train import state as state_lib
from jaxpo.train import step as step_lib

VOCAB = 32


def hand_batch(prompts, responses, scores, *, length=12):
    """A padded-layout packed batch, built by hand: one row per response (prompt + response).

    Args:
      prompts: per group, the prompt token list.
      responses: per group, K response token lists.
      scores: per group, K scores.

    Returns:
      ``(batch dict of numpy arrays, num_nodes=2)``.
    """
    ng, k = len(prompts), len(responses[0])
    rows = ng * k
    out = {name: np.zeros((rows, length), np.int32) for name in
           ("tokens", "positions", "segment", "node_pre", "node_last", "node_slot")}
    out["pred_index"] = np.full((rows, length), -1, np.int32)
    out["response_nodes"] = np.full((ng, k, 1), -1, np.int32)
    for g in range(ng):
        for j in range(k):
            r, p, y = g * k + j, prompts[g], responses[g][j]
            seq = list(p) + list(y)
            n = len(seq)
            out["tokens"][r, :n] = seq
            out["positions"][r, :n] = np.arange(n)
            out["segment"][r, :n] = 1
            out["node_pre"][r, len(p):n] = 1
            out["node_last"][r, :n] = 1
            out["node_slot"][r, len(p):n] = 1
            out["pred_index"][r, len(p):n] = np.arange(len(p) - 1, n - 1)
            out["response_nodes"][g, j, 0] = r * 2 + 1
    out["scores"] = np.asarray(scores, np.float32)
    out["response_mask"] = np.ones((ng, k), bool)
    out["group_mask"] = np.ones((ng,), bool)
    return out, 2


def pair_batch(seed=0, ng=4):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, VOCAB, rng.integers(2, 5))) for _ in range(ng)]
    responses = [[list(rng.integers(1, VOCAB, rng.integers(1, 6))) for _ in range(2)]
                 for _ in range(ng)]
    return hand_batch(prompts, responses, [[1.0, 0.0]] * ng), prompts, responses


def tiny_model(seed=0):
    cfg = get_preset("tiny", vocab_size=VOCAB, num_layers=1, hidden_size=32,
                     intermediate_size=64, num_heads=2, num_kv_heads=1)
    return Transformer(cfg, rngs=nnx.Rngs(params=seed))


@jax.jit
def _causal_log_softmax(params, seqs):
    graphdef, _ = state_lib.split_model(tiny_model())
    return jax.nn.log_softmax(nnx.merge(graphdef, params)(seqs), -1)


def causal_logps(model, prompts, responses):
    """Summed log-probs ``[NG, K]`` of each response after its prompt, from the model's plain
    causal logits (one unpacked sequence per response; numpy float64 sums)."""
    seqs = np.zeros((len(prompts) * len(responses[0]), 12), np.int32)
    spans = []
    for g, (p, ys) in enumerate(zip(prompts, responses)):
        for j, y in enumerate(ys):
            r = g * len(ys) + j
            seqs[r, :len(p) + len(y)] = list(p) + list(y)
            spans.append((r, len(p), list(y)))
    _, params = state_lib.split_model(model)
    logp = np.asarray(_causal_log_softmax(params, seqs), np.float64)
    out = [sum(logp[r, n - 1 + t, tok] for t, tok in enumerate(y)) for r, n, y in spans]
    return np.array(out).reshape(len(prompts), -1)


def _single_device_step(objective, mode, graphdef, **kw):
    tx = optax.sgd(0.5)
    step = step_lib.make_train_step(graphdef, objective, tx, optax.constant_schedule(0.5),
                                    reference_mode=mode, num_nodes=2, chunk_size=8, **kw)
    return tx, step


def test_dpo_step_matches_causal_forward_and_sgd():
    (batch, _), prompts, responses = pair_batch()
    model = tiny_model()
    ref_model = tiny_model(seed=1)  # a different reference, so r = ℓ − ℓ_ref is not 0
    graphdef, params = state_lib.split_model(model)
    _, ref_params = state_lib.split_model(ref_model)
    tx, step = _single_device_step(losses.get("dpo"), "model", graphdef)
    state = state_lib.new_state(params, tx)

    # Independent: DPO on log-probs from the causal forward of each unpacked sequence.
    pol = causal_logps(model, prompts, responses)
    ref = causal_logps(ref_model, prompts, responses)
    h = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    expected = np.mean(np.logaddexp(0.0, -0.1 * h))

    old = jax.tree.map(np.asarray, params)
    new_state, metrics = step_lib.TrainStep(step, ref_params)(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/margins"]), 0.1 * h.mean(), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(float(metrics["logps/chosen"]), pol[:, 0].mean(), rtol=1e-5)
    assert int(new_state.step) == 1 and int(new_state.skipped) == 0
    assert float(metrics["learning_rate"]) == 0.5
    # SGD: new = old − lr·g, so the update's norm is lr·grad_norm.
    delta = jax.tree.map(lambda a, b: np.asarray(a) - b, new_state.params, old)
    norm = np.sqrt(sum(np.sum(d.astype(np.float64) ** 2) for d in jax.tree.leaves(delta)))
    np.testing.assert_allclose(norm, 0.5 * float(metrics["grad_norm"]), rtol=1e-4)
    # The reference params are untouched (not donated, not updated).
    assert all(not x.is_deleted() for x in jax.tree.leaves(ref_params))


def test_reference_gets_no_gradient_and_model_equals_precomputed():
    (batch, _), prompts, responses = pair_batch(seed=3)
    model = tiny_model()
    graphdef, params = state_lib.split_model(model)
    ref = causal_logps(model, prompts, responses)
    outs = {}
    for mode in ("model", "precomputed"):
        tx, step = _single_device_step(losses.get("dpo"), mode, graphdef)
        b = dict(batch, ref_logps=ref.astype(np.float32))
        ref_params = jax.tree.map(jnp.copy, params) if mode == "model" else None
        state = state_lib.new_state(jax.tree.map(jnp.copy, params), tx)
        new_state, metrics = step(state, ref_params, b)
        outs[mode] = (float(metrics["loss"]), jax.tree.map(np.asarray, new_state.params))
    # At the start policy = reference: loss = log 2, and the gradient is the policy's alone.
    np.testing.assert_allclose(outs["model"][0], np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(outs["precomputed"][0], np.log(2.0), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(outs["model"][1]), jax.tree.leaves(outs["precomputed"][1])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # If the reference also got gradient, the DPO gradient at policy = reference would be 0.
    old = jax.tree.leaves(jax.tree.map(np.asarray, params))
    assert any(np.abs(a - b).max() > 1e-6 for a, b in zip(jax.tree.leaves(outs["model"][1]), old))


def test_reference_free_simpo():
    (batch, _), prompts, responses = pair_batch(seed=5)
    model = tiny_model()
    graphdef, params = state_lib.split_model(model)
    lengths = np.array([[len(y) for y in ys] for ys in responses])
    pol = causal_logps(model, prompts, responses) / lengths
    tx, step = _single_device_step(losses.get("simpo"), "none", graphdef)
    _, metrics = step(state_lib.new_state(params, tx), None, batch)
    expected = np.mean(np.logaddexp(0.0, -(2.0 * (pol[:, 0] - pol[:, 1]) - 0.5)))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)


def test_nonfinite_loss_skips_update():
    (batch, _), _, _ = pair_batch(seed=1)
    graphdef, params = state_lib.split_model(tiny_model())
    tx, step = _single_device_step(losses.get("dpo"), "precomputed", graphdef)
    before = jax.tree.map(np.asarray, params)
    bad = dict(batch, ref_logps=np.full((4, 2), np.nan, np.float32))
    new_state, metrics = step(state_lib.new_state(params, tx), None, bad)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(new_state.skipped) == 1 and int(new_state.step) == 1
    assert float(metrics["skipped_steps"]) == 1.0
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_refusals_name_the_problem():
    graphdef, _ = state_lib.split_model(tiny_model())
    with pytest.raises(ValueError, match="needs a reference.*reference.mode='none'"):
        step_lib.make_train_step(graphdef, losses.get("dpo"), optax.sgd(0.1),
                                 reference_mode="none", num_nodes=2)
    with pytest.raises(ValueError, match="not supported by the trainer yet"):
        step_lib.make_train_step(graphdef, losses.get("tdpo"), optax.sgd(0.1), num_nodes=2)
    with pytest.raises(ValueError, match="reference.mode='bogus'"):
        step_lib.make_train_step(graphdef, losses.get("dpo"), optax.sgd(0.1),
                                 reference_mode="bogus", num_nodes=2)
