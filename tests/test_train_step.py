"""The train step on one device: loss and gradients against a plain causal forward, the frozen
reference, precomputed and reference-free modes, gradient accumulation over micro-batches,
token-level objectives (TDPO, WPO, LD-DPO), TPO's hidden-state step similarity, what an
objective's ``needs`` make the step compute, BCO's running reward mean, non-finite skipping, and
the refusals of ``jaxpo.train.setup.check``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data_layout import groups_st

from jaxpo import losses
from jaxpo.config import Config, replace
from jaxpo.data.batcher import BatchConfig, pack_groups
from jaxpo.models.config import get_preset
from jaxpo.models.logprobs import token_stats
from jaxpo.models.transformer import Transformer
from jaxpo.train import loss_inputs as li
from jaxpo.train import setup
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


def make_spec(objective, graphdef, mode="model", *, num_nodes=2, chunk_size=8):
    """A StepSpec for ``objective`` (a name, built with its defaults, or an Objective)."""
    hparams = {}
    if isinstance(objective, str):
        objective, hparams = losses.build(objective)
    logp = li.LogpSpec(graphdef, num_nodes=num_nodes, chunk_size=chunk_size,
                       reference_mode=mode)
    return step_lib.StepSpec(logp=logp, objective=objective, hparams=hparams,
                             metrics_beta=losses.metrics_beta(objective, hparams))


def _single_device_step(objective, mode, graphdef, *, tx=None, num_nodes=2):
    """``(tx, step)``: SGD(0.5) inside apply_if_finite (as make_optimizer wraps its chain)."""
    tx = tx or optax.apply_if_finite(optax.sgd(0.5), 2**30)
    step = step_lib.make_train_step(make_spec(objective, graphdef, mode, num_nodes=num_nodes),
                                    tx, schedule=optax.constant_schedule(0.5))
    return tx, step


def _copy(tree):
    """A host copy (the state is donated to the step)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def test_dpo_step_matches_causal_forward_and_sgd():
    (batch, _), prompts, responses = pair_batch()
    model = tiny_model()
    ref_model = tiny_model(seed=1)  # a different reference, so r = ℓ − ℓ_ref is not 0
    graphdef, params = state_lib.split_model(model)
    _, ref_params = state_lib.split_model(ref_model)
    tx, step = _single_device_step("dpo", "model", graphdef)
    state = state_lib.new_state(params, tx)

    # Independent: DPO on log-probs from the causal forward of each unpacked sequence.
    pol = causal_logps(model, prompts, responses)
    ref = causal_logps(ref_model, prompts, responses)
    h = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    expected = np.mean(np.logaddexp(0.0, -0.1 * h))

    old = _copy(params)
    new_state, metrics = step(state, ref_params, step_lib.stack(batch))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/margins"]), 0.1 * h.mean(), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(float(metrics["logps/chosen"]), pol[:, 0].mean(), rtol=1e-5)
    assert int(new_state.step) == 1
    assert float(metrics["skipped_steps"]) == 0.0 and float(metrics["nonfinite_streak"]) == 0.0
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
        tx, step = _single_device_step("dpo", mode, graphdef)
        b = dict(batch, ref_logps=ref.astype(np.float32)) if mode == "precomputed" else batch
        ref_params = jax.tree.map(jnp.copy, params) if mode == "model" else None
        state = state_lib.new_state(jax.tree.map(jnp.copy, params), tx)
        new_state, metrics = step(state, ref_params, step_lib.stack(b))
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
    tx, step = _single_device_step("simpo", "none", graphdef)
    _, metrics = step(state_lib.new_state(params, tx), None, step_lib.stack(batch))
    expected = np.mean(np.logaddexp(0.0, -(2.0 * (pol[:, 0] - pol[:, 1]) - 0.5)))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)


def test_gradient_accumulation_equals_one_batch_of_all_groups():
    """A = 2 micro-batches of 2 groups give the update of one batch of those 4 groups: the step
    averages the micro-batches' mean gradients (equal group counts: the mean over groups)."""
    rng = np.random.default_rng(13)
    prompts = [list(rng.integers(1, VOCAB, rng.integers(2, 5))) for _ in range(4)]
    responses = [[list(rng.integers(1, VOCAB, rng.integers(1, 6))) for _ in range(2)]
                 for _ in range(4)]
    scores = [[1.0, 0.0]] * 4
    whole, _ = hand_batch(prompts, responses, scores)
    first, _ = hand_batch(prompts[:2], responses[:2], scores[:2])
    second, _ = hand_batch(prompts[2:], responses[2:], scores[2:])
    graphdef, params = state_lib.split_model(tiny_model())
    _, ref_params = state_lib.split_model(tiny_model(seed=1))
    out = {}
    for name, batch in (("one", step_lib.stack(whole)), ("accum", step_lib.stack(first, second))):
        tx = _sgd_keeping_gradient(0.5)
        _, step = _single_device_step("dpo", "model", graphdef, tx=tx)
        state = state_lib.new_state(jax.tree.map(jnp.copy, params), tx)
        new_state, metrics = step(state, ref_params, batch)
        out[name] = (_copy(new_state.params), _copy(new_state.opt_state),
                     jax.tree.map(float, metrics))
    assert step_lib.stack(first, second)["tokens"].shape == (2,) + first["tokens"].shape
    (p1, g1, m1), (p2, g2, m2) = out["one"], out["accum"]
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6 * abs(m1[key]) + 1e-9,
                                   err_msg=key)
    assert m1["grad_norm"] > 0
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The gradients themselves (the params barely move) agree, to fp32 summation order.
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


def test_low_precision_gradients_accumulate_in_float32():
    """bf16 params: 8 micro-batches that are the same batch give exactly that batch's
    gradient (summed in float32, 8g/8 = g), where a running bf16 sum rounds at 3g, 5g, 7g."""
    cfg = get_preset("tiny", vocab_size=VOCAB, num_layers=1, hidden_size=32,
                     intermediate_size=64, num_heads=2, num_kv_heads=1,
                     param_dtype="bfloat16", dtype="float32")
    graphdef, params = state_lib.split_model(Transformer(cfg, rngs=nnx.Rngs(params=0)))
    _, ref_params = state_lib.split_model(Transformer(cfg, rngs=nnx.Rngs(params=1)))
    (batch, _), _, _ = pair_batch(seed=3, ng=2)

    def gradient(batches):
        tx = _sgd_keeping_gradient(0.5)
        _, step = _single_device_step("dpo", "model", graphdef, tx=tx)
        state = state_lib.new_state(jax.tree.map(jnp.copy, params), tx)
        new_state, _ = step(state, ref_params, step_lib.stack(*batches))
        return jax.tree.leaves(_copy(new_state.opt_state))

    one, eight = gradient([batch]), gradient([batch] * 8)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in eight)
    rounded = 0
    for a, b in zip(eight, one):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        running = jnp.zeros(b.shape, jnp.bfloat16)
        for _ in range(8):
            running = running + b
        rounded += int(np.sum(np.asarray(running / 8, np.float32) != np.asarray(b, np.float32)))
    assert rounded > 0  # the check tells a bf16 running sum apart


def _sgd_keeping_gradient(lr):
    """SGD whose optimiser state is the last gradient it was given (to compare gradients)."""

    def update(grads, state, params=None):
        return jax.tree.map(lambda g: -lr * g, grads), grads

    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), update)


def test_nonfinite_loss_skips_update_and_counts():
    """A NaN loss changes no parameter, no optimiser moment and no running statistic, and is
    counted; the next finite step applies and resets the streak."""
    (batch, _), prompts, responses = pair_batch(seed=1)
    model = tiny_model()
    graphdef, params = state_lib.split_model(model)
    ref = causal_logps(tiny_model(seed=1), prompts, responses).astype(np.float32)
    tx = optax.apply_if_finite(optax.sgd(0.5, momentum=0.9), 2**30)
    _, step = _single_device_step("bco", "precomputed", graphdef, tx=tx)  # stats: reward mean
    state = state_lib.new_state(params, tx)
    before = _copy((state.params, state.opt_state.inner_state, state.stats))
    bad = step_lib.stack(dict(batch, ref_logps=np.full((4, 2), np.nan, np.float32)))
    for n in (1, 2):
        state, metrics = step(state, None, bad)
        assert not np.isfinite(float(metrics["loss"]))
        assert not np.isfinite(float(metrics["grad_norm"]))
        assert int(state.step) == n
        assert float(metrics["skipped_steps"]) == n and float(metrics["nonfinite_streak"]) == n
        after = (state.params, state.opt_state.inner_state, state.stats)
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
            np.testing.assert_array_equal(np.asarray(a), b)  # bitwise
    state, metrics = step(state, None, step_lib.stack(dict(batch, ref_logps=ref)))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert int(state.step) == 3
    assert float(metrics["nonfinite_streak"]) == 0.0 and float(metrics["skipped_steps"]) == 2.0
    assert any(np.abs(np.asarray(a) - b).max() > 0
               for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before[0])))
    assert float(state.stats["reward_count"]) == 8.0


def test_bco_running_reward_mean_matches_numpy():
    """BCO's δ is the running mean of β·r over every real response seen (this batch included);
    the state carries it to the next step."""
    (batch, _), prompts, responses = pair_batch(seed=2)
    model, ref_model = tiny_model(), tiny_model(seed=1)
    graphdef, params = state_lib.split_model(model)
    _, ref_params = state_lib.split_model(ref_model)
    r = causal_logps(model, prompts, responses) - causal_logps(ref_model, prompts, responses)
    tx, step = _single_device_step("bco", "model", graphdef)
    state, metrics = step(state_lib.new_state(params, tx), ref_params, step_lib.stack(batch))
    delta = 0.1 * r.mean()
    scale = 1e-6 * 0.1 * np.abs(r).mean()
    np.testing.assert_allclose(float(state.stats["reward_mean"]), delta, rtol=1e-5, atol=scale)
    np.testing.assert_allclose(float(metrics["reward_mean"]), delta, rtol=1e-5, atol=scale)
    assert float(state.stats["reward_count"]) == 8.0

    def bco_loss(r, delta):
        return np.mean(np.logaddexp(0.0, -(0.1 * r[:, 0] - delta))
                       + np.logaddexp(0.0, 0.1 * r[:, 1] - delta))

    np.testing.assert_allclose(float(metrics["loss"]), bco_loss(r, delta), rtol=1e-5)

    # The next step: δ is the mean over both batches' 16 responses, under the updated policy.
    (batch2, _), prompts2, responses2 = pair_batch(seed=3)
    updated = nnx.merge(graphdef, jax.tree.map(jnp.copy, state.params))
    r2 = (causal_logps(updated, prompts2, responses2)
          - causal_logps(ref_model, prompts2, responses2))
    state, metrics = step(state, ref_params, step_lib.stack(batch2))
    delta2 = (8 * delta + 0.1 * r2.sum()) / 16
    np.testing.assert_allclose(float(state.stats["reward_mean"]), delta2, rtol=1e-5, atol=scale)
    assert float(state.stats["reward_count"]) == 16.0
    np.testing.assert_allclose(float(metrics["loss"]), bco_loss(r2, delta2), rtol=1e-5)


def _config(**sections):
    return replace(Config(), sections)


def _check(config):
    objective, _ = setup.build_objective(config)
    setup.check(config, objective)


def test_setup_check_refuses_and_names_the_config_fields():
    with pytest.raises(ValueError, match=r"config\.loss\.name='dpo' needs a reference.*"
                                         r"config\.reference\.mode='none'"):
        _check(_config(reference={"mode": "none"}))
    with pytest.raises(ValueError, match=r"config\.loss\.name='tdpo' is token-level.*"
                                         r"config\.reference\.mode='precomputed'"):
        _check(_config(loss={"name": "tdpo"}, reference={"mode": "precomputed"}))
    with pytest.raises(ValueError, match=r"config\.reference\.mode='precomputed'.*"
                                         r"config\.data\.max_steps > 1"):
        _check(_config(loss={"name": "tpo"}, reference={"mode": "precomputed"},
                       data={"max_steps": 3, "max_responses": 4}))
    with pytest.raises(ValueError, match=r"config\.data\.format='unpaired'.*"
                                         r"config\.loss\.name='dpo'"):
        _check(_config(data={"format": "unpaired"}))
    with pytest.raises(ValueError, match=r"config\.model\.preset='nope'"):
        _check(_config(model={"preset": "nope"}))
    with pytest.raises(ValueError, match=r"config\.loss: .*'bogus'"):
        _check(_config(loss={"name": "bogus"}))
    with pytest.raises(ValueError, match=r"config\.reference\.mode='bogus'"):
        _config(reference={"mode": "bogus"})
    # What works passes.
    _check(_config())
    _check(_config(reference={"mode": "precomputed"}))
    _check(_config(loss={"name": "simpo"}, reference={"mode": "none"}))
    _check(_config(loss={"name": "simpo"}))  # reference-free under mode=model: no reference
    _check(_config(loss={"name": "tdpo"}))
    _check(_config(loss={"name": "kto"}, data={"format": "unpaired", "max_responses": 1}))


def test_a_reference_objective_without_reference_fails_at_trace():
    """setup.check refuses it first; a hand-built spec still fails loudly, never silently."""
    (batch, _), _, _ = pair_batch()
    graphdef, params = state_lib.split_model(tiny_model())
    for mode, message in (("none", "reference.mode='none'"), ("precomputed", "precompute-ref")):
        spec = li.LogpSpec(graphdef, num_nodes=2, chunk_size=8, reference_mode=mode)
        fn = jax.jit(lambda p, b, spec=spec: li.batch_inputs(spec, losses.get("dpo"), p, None, b))
        with pytest.raises(ValueError, match=message):
            fn(params, batch)


# ------------------------------------------------------------------ token-level objectives


def causal_token_rows(model, prompts, responses):
    """Per response, the full next-token log-softmax ``[len(y), V]`` (float64) at the positions
    predicting its tokens, from the plain causal forward of the unpacked sequence."""
    seqs = np.zeros((len(prompts) * len(responses[0]), 12), np.int32)
    spans = []
    for g, (p, ys) in enumerate(zip(prompts, responses)):
        for j, y in enumerate(ys):
            r = g * len(ys) + j
            seqs[r, :len(p) + len(y)] = list(p) + list(y)
            spans.append((r, len(p), list(y)))
    _, params = state_lib.split_model(model)
    logp = np.asarray(_causal_log_softmax(params, seqs), np.float64)
    return [(logp[r, n - 1:n - 1 + len(y)], np.array(y)) for r, n, y in spans]


def numpy_token_stats(model, ref_model, prompts, responses):
    """Per response (row-major over groups): token log-probs of policy and reference, per-token
    KL(π_ref ‖ π_θ) and log Σ_v p_v², computed directly from full log-softmax rows."""
    out = []
    for (pol, y), (ref, _) in zip(causal_token_rows(model, prompts, responses),
                                  causal_token_rows(ref_model, prompts, responses)):
        t = np.arange(len(y))
        out.append({"lp": pol[t, y], "lr": ref[t, y],
                    "kl": np.sum(np.exp(ref) * (ref - pol), axis=-1),
                    "log_sq": np.log(np.sum(np.exp(2 * pol), axis=-1))})
    return out


def _token_step(name_or_objective, seed=7, **kw):
    (batch, _), prompts, responses = pair_batch(seed=seed)
    model, ref_model = tiny_model(), tiny_model(seed=1)
    graphdef, params = state_lib.split_model(model)
    _, ref_params = state_lib.split_model(ref_model)
    stats = numpy_token_stats(model, ref_model, prompts, responses)  # before params are donated
    tx, step = _single_device_step(name_or_objective, "model", graphdef, **kw)
    _, metrics = step(state_lib.new_state(params, tx), ref_params, step_lib.stack(batch))
    return metrics, [stats[i:i + 2] for i in range(0, len(stats), 2)]  # per group: (w, l)


def _assert_step_ok(metrics):
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    assert float(metrics["skipped_steps"]) == 0.0


def test_tdpo_step_matches_token_kl_from_full_logits():
    beta, alpha = 0.1, 0.5
    metrics, groups = _token_step("tdpo")
    expected = []
    for w, l in groups:
        h = np.sum(w["lp"] - w["lr"]) - np.sum(l["lp"] - l["lr"])
        kl_term = alpha * beta * (np.sum(l["kl"]) - np.sum(w["kl"]))
        expected.append(np.logaddexp(0.0, -(beta * h - kl_term)))
    assert abs(np.sum(groups[0][0]["kl"])) > 1e-3  # policy ≠ reference: the KL term matters
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(expected), rtol=1e-5)
    _assert_step_ok(metrics)


def test_wpo_and_ld_steps_match_numpy():
    beta, ld_alpha = 0.1, 0.3
    metrics, groups = _token_step(losses.with_wpo("dpo"))
    expected = []
    for w, l in groups:
        h = np.sum(w["lp"] - w["lr"]) - np.sum(l["lp"] - l["lr"])
        weight = np.prod([np.exp(np.mean(y["lp"] - y["log_sq"])) for y in (w, l)])
        expected.append(weight * np.logaddexp(0.0, -beta * h))
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(expected), rtol=1e-5)
    _assert_step_ok(metrics)

    metrics, groups = _token_step(losses.with_ld("dpo", alpha=ld_alpha))

    def ld(x, shared):
        return np.sum(x[:shared]) + ld_alpha * np.sum(x[shared:])

    expected = []
    for w, l in groups:
        shared = min(len(w["lp"]), len(l["lp"]))
        h = (ld(w["lp"], shared) - ld(w["lr"], shared)) - (ld(l["lp"], shared)
                                                           - ld(l["lr"], shared))
        expected.append(np.logaddexp(0.0, -beta * h))
    assert any(len(w["lp"]) != len(l["lp"]) for w, l in groups)  # some tails are scaled
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(expected), rtol=1e-5)
    _assert_step_ok(metrics)


# ------------------------------------------------------------------ trees: steps and similarity


def tree_batch(groups, *, length=16):
    """One row per group, share-prefix layout: prompt (node 0), a shared step (node 1) with two
    leaves (nodes 2, 3), and a one-step response off the root (node 4).

    Args:
      groups: per group ``(prompt, step1, leaf2, leaf3, lone4)`` token lists.

    Returns:
      ``(batch, num_nodes=5, spans)``: ``spans[g][node]`` the row positions of the node.
    """
    ng, n = len(groups), 5
    out = {name: np.zeros((ng, length), np.int32) for name in
           ("tokens", "positions", "segment", "node_pre", "node_last", "node_slot")}
    out["pred_index"] = np.full((ng, length), -1, np.int32)
    parent, last = [-1, 0, 1, 1, 0], [4, 3, 2, 3, 4]
    all_spans = []
    for g, nodes in enumerate(groups):
        spans, cursor, depth_end = [], 0, {}
        for node, toks in enumerate(nodes):
            idx = np.arange(cursor, cursor + len(toks))
            start = 0 if node == 0 else depth_end[parent[node]]
            out["tokens"][g, idx] = toks
            out["positions"][g, idx] = start + np.arange(len(toks))
            out["segment"][g, idx] = 1
            out["node_pre"][g, idx] = out["node_slot"][g, idx] = node
            out["node_last"][g, idx] = last[node]
            if node:
                out["pred_index"][g, idx] = np.concatenate([[spans[parent[node]][-1]], idx[:-1]])
            depth_end[node] = start + len(toks)
            spans.append(idx)
            cursor += len(toks)
        all_spans.append(spans)
    ids = np.array([[[1, 2], [1, 3], [4, -1]]], np.int32)
    out["response_nodes"] = ids + np.where(ids >= 0, n * np.arange(ng)[:, None, None], 0)
    out["scores"] = np.tile(np.array([[2.0, 1.0, 0.0]], np.float32), (ng, 1))
    out["response_mask"] = np.ones((ng, 3), bool)
    out["group_mask"] = np.ones((ng,), bool)
    return out, n, all_spans


def _tree_groups():
    rng = np.random.default_rng(11)
    return [[list(rng.integers(1, VOCAB, size)) for size in (3, 2, 3, 2, 3)] for _ in range(2)]


def test_response_tokens_concatenate_steps():
    batch, n, spans = tree_batch(_tree_groups())
    values = np.arange(batch["tokens"].size, dtype=np.float32).reshape(batch["tokens"].shape)
    out, mask = jax.jit(lambda v, b: li.response_tokens({"v": v}, b, n, 16))(values, batch)
    for g, s in enumerate(spans):
        for k, path in enumerate(([1, 2], [1, 3], [4])):
            expected = np.concatenate([values[g, s[node]] for node in path])
            np.testing.assert_array_equal(np.asarray(out["v"])[g, k, :len(expected)], expected)
            assert np.asarray(mask)[g, k].sum() == len(expected)
            assert not np.asarray(out["v"])[g, k, len(expected):].any()


def test_tpo_step_similarity_is_cosine_of_mean_hidden_states():
    batch, n, spans = tree_batch(_tree_groups())
    model, ref_model = tiny_model(), tiny_model(seed=1)
    graphdef, params = state_lib.split_model(model)
    _, ref_params = state_lib.split_model(ref_model)
    hidden = np.asarray(model.hidden(*(jnp.asarray(batch[k]) for k in (
        "tokens", "positions", "segment", "node_pre", "node_last"))), np.float64)
    sim = np.asarray(jax.jit(lambda b: li.step_similarity(
        jnp.asarray(hidden, jnp.float32), b, n))(batch))  # [NG, K, K, M]

    paths = ([1, 2], [1, 3], [4, None])
    expected = np.zeros((2, 3, 3, 2))
    for g, s in enumerate(spans):
        for i, pi in enumerate(paths):
            for j, pj in enumerate(paths):
                for m in range(2):
                    a, b = pi[m], pj[m]
                    if a is None or b is None:
                        continue
                    u, v = hidden[g, s[a]].mean(0), hidden[g, s[b]].mean(0)
                    cos = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
                    expected[g, i, j, m] = 1.0 if a == b else np.clip(cos, 0.0, 1.0)
    np.testing.assert_allclose(sim, expected, atol=1e-5)
    assert np.all(sim[:, 0, 1, 0] == 1.0)  # the shared step: exactly 1
    assert np.all(sim[:, :, 2, 1] == 0.0) and np.all(sim[:, 2, :, 1] == 0.0)  # missing step
    assert 0.0 < expected[0, 0, 1, 1] < 1.0  # distinct leaves: a real cosine

    # The TPO step reads this similarity: its loss equals tpo on the step log-probs with it.
    logps = jax.jit(lambda p, b: li.sequence_logps(graphdef, p, b, num_nodes=n, chunk_size=8))
    pol, ref = logps(params, batch), logps(ref_params, batch)
    tx, step = _single_device_step("tpo", "model", graphdef, num_nodes=n)
    _, metrics = step(state_lib.new_state(params, tx), ref_params, step_lib.stack(batch))
    step_mask = batch["response_nodes"] >= 0
    expected_loss = losses.tpo(pol.step_logps, ref.step_logps, batch["scores"],
                               step_where=step_mask, step_similarity=expected)
    np.testing.assert_allclose(float(metrics["loss"]), float(jnp.mean(expected_loss)),
                               rtol=1e-5)
    without = losses.tpo(pol.step_logps, ref.step_logps, batch["scores"],
                         step_where=step_mask, step_similarity=expected * (expected == 1.0))
    assert abs(float(jnp.mean(without)) - float(metrics["loss"])) > 1e-6
    _assert_step_ok(metrics)


# ------------------------------------------------------------------ needs drive the computation


def _same_node(nodes):
    """The default step similarity ``[NG, K, K, M]``: 1 where step m is the same node."""
    same = (nodes[:, :, None, :] == nodes[:, None, :, :]) & (nodes[:, :, None, :] >= 0)
    return same.astype(np.float32)


def _inputs(objective, graphdef, params, ref_params, batch, *, num_nodes, mode="model"):
    objective = losses.get(objective) if isinstance(objective, str) else objective
    spec = li.LogpSpec(graphdef, num_nodes=num_nodes, chunk_size=8, reference_mode=mode)
    fn = jax.jit(lambda p, r, b: li.batch_inputs(spec, objective, p, r, b))
    return jax.tree.map(np.asarray, fn(params, ref_params, batch))


def test_needs_drive_what_batch_inputs_computes():
    model, ref_model = tiny_model(), tiny_model(seed=1)
    graphdef, params = state_lib.split_model(model)
    _, ref_params = state_lib.split_model(ref_model)
    tree, n, _ = tree_batch(_tree_groups())  # M = 2: a hidden-state similarity is possible
    (pair, _), prompts, responses = pair_batch(seed=4)  # M = 1
    hidden = model.hidden(*(jnp.asarray(tree[k]) for k in (
        "tokens", "positions", "segment", "node_pre", "node_last")))
    cosine = np.asarray(jax.jit(lambda h, b: li.step_similarity(h, b, n))(hidden, tree))
    default = _same_node(tree["response_nodes"])
    assert np.abs(cosine - default).max() > 1e-3  # the two really differ on this batch

    # DPO needs the reference only: the same-node similarity, no KTO point, no token arrays.
    dpo = _inputs("dpo", graphdef, params, ref_params, tree, num_nodes=n)
    np.testing.assert_array_equal(dpo.step_similarity, default)
    assert dpo.kto_kl is None and dpo.reward_mean is None
    assert dpo.reference_logps is not None and dpo.policy_token_logps is None
    assert dpo.token_mask is None and dpo.token_kl is None

    # TPO on trees (M > 1): the hidden-state similarity; on pairs (M = 1): the default.
    tpo = _inputs("tpo", graphdef, params, ref_params, tree, num_nodes=n)
    np.testing.assert_allclose(tpo.step_similarity, cosine, rtol=1e-5, atol=1e-6)
    assert tpo.kto_kl is None
    tpo_pair = _inputs("tpo", graphdef, params, ref_params, pair, num_nodes=2)
    np.testing.assert_array_equal(tpo_pair.step_similarity, _same_node(pair["response_nodes"]))
    pair_hidden = model.hidden(*(jnp.asarray(pair[k]) for k in (
        "tokens", "positions", "segment", "node_pre", "node_last")))
    pair_cosine = np.asarray(jax.jit(lambda h, b: li.step_similarity(h, b, 2))(pair_hidden, pair))
    assert np.abs(pair_cosine - tpo_pair.step_similarity).max() > 1e-3  # had it been computed
    np.testing.assert_array_equal(tpo_pair.step_similarity[..., 0], np.broadcast_to(
        np.eye(2, dtype=np.float32), (4, 2, 2)))  # two distinct responses: no cosine off-diagonal

    # KTO needs its reference point: the batch mean policy − reference log-ratio.
    kto = _inputs("kto", graphdef, params, ref_params, pair, num_nodes=2)
    pol = causal_logps(model, prompts, responses)
    ref = causal_logps(ref_model, prompts, responses)
    assert kto.kto_kl is not None and kto.kto_kl.shape == ()
    np.testing.assert_allclose(kto.kto_kl, np.mean(pol - ref), rtol=1e-5,
                               atol=1e-6 * np.abs(pol).mean())
    np.testing.assert_allclose(kto.policy_logps, pol, rtol=1e-5)
    np.testing.assert_allclose(kto.reference_logps, ref, rtol=1e-5)

    # A reference-free objective computes no reference, even under reference_mode="model"
    # (ref_params=None would fail if it tried).
    simpo = _inputs("simpo", graphdef, params, None, pair, num_nodes=2)
    assert simpo.reference_logps is None and simpo.kto_kl is None

    # Token arrays only for token-level objectives; log Σ p² only for WPO.
    tdpo = _inputs("tdpo", graphdef, params, ref_params, pair, num_nodes=2)
    assert tdpo.token_kl is not None and tdpo.reference_token_logps is not None
    assert tdpo.token_log_sum_sq_probs is None
    wpo = _inputs(losses.with_wpo("dpo"), graphdef, params, ref_params, pair, num_nodes=2)
    assert wpo.token_log_sum_sq_probs is not None and wpo.policy_token_logps is not None


# ------------------------------------------------------------------ the three layouts agree

LAYOUT_SEQ = {"padded": 16, "packed": 96, "share_prefix": 28}  # room for any drawn group


@jax.jit
def _token_arrays(params, ref_params, batch):
    graphdef, _ = state_lib.split_model(tiny_model())
    hidden, unembedding = li.forward(graphdef, params, batch)
    ref_hidden, ref_unembedding = li.forward(graphdef, ref_params, batch)
    stats = token_stats(hidden, unembedding, batch["tokens"], batch["pred_index"],
                        ref_hidden=ref_hidden, ref_unembedding=ref_unembedding, with_sq=True,
                        chunk_size=8)
    out, mask = li.response_tokens(stats, batch, 24, 16)
    return out, mask, li.step_similarity(hidden, batch, 24)


@settings(max_examples=8, deadline=None)
@given(groups=st.integers(1, 3).flatmap(
    lambda n: st.tuples(*(groups_st(gid=i) for i in range(n)))))
def test_layouts_give_the_same_token_arrays_and_similarity(groups):
    _, params = state_lib.split_model(tiny_model())
    _, ref_params = state_lib.split_model(tiny_model(seed=1))
    found = {}
    for layout, seq_len in LAYOUT_SEQ.items():
        cfg = BatchConfig(layout, batch_size=3, seq_len=seq_len, max_responses=6,
                          node_slots=24, max_steps=3)
        batch = pack_groups(list(groups), cfg)
        batch["tokens"] = np.minimum(batch["tokens"], VOCAB - 1)
        out, mask, sim = jax.tree.map(np.asarray, _token_arrays(params, ref_params, batch))
        for g in np.nonzero(batch["group_mask"])[0]:
            found.setdefault(int(batch["group_id"][g]), []).append(
                ({k: v[g] for k, v in out.items()}, mask[g], sim[g]))
    for per_layout in found.values():
        (out, mask, sim), *others = per_layout
        assert len(others) == 2 and mask.any()
        for out2, mask2, sim2 in others:
            np.testing.assert_array_equal(mask, mask2)
            for name in out:
                np.testing.assert_allclose(out[name], out2[name], atol=2e-5, err_msg=name)
            # A step shared in the tree is one node (S = 1 by identity) in share_prefix and
            # copies in padded rows (S = 1 by cosine of equal hidden states).
            np.testing.assert_allclose(sim, sim2, atol=2e-5)
