"""LoRA adapters: the config keys, only the adapters are trained (and held by the optimiser),
the reference is the base model (adapters off) bitwise, step 0 is the base model, gradients
equal those of the merged weights, merged export equals the adapted model, and the PEFT adapter
files follow PEFT's format; slow: gradients equal the merged weights', a LoRA DPO run from the
SFT warm-up improves and exports, a resumed LoRA run is bitwise the uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file
from test_train_step import pair_batch

from jaxpo import cli
from jaxpo.config import Config, apply_overrides, differences, from_dict, load_config, replace
from jaxpo.models import export_hf, load_hf, lora
from jaxpo.train import loop, setup
from jaxpo.train import loss_inputs as li
from jaxpo.train import state as state_lib

RANK, ALPHA = 4, 8.0
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def test_config_overrides_and_errors():
    cfg = apply_overrides(Config(), ["--config.model.lora.rank=8",
                                     "--config.model.lora.targets=q,v"])
    assert (cfg.model.lora.rank, cfg.model.lora.targets, cfg.model.lora.alpha) == (
        8, ("q", "v"), 16.0)
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # what checkpoints store
    assert differences(Config(), cfg)["model.lora.rank"] == (0, 8)
    # A later override keeps the earlier nested fields (a preset's rank, the command's targets).
    again = apply_overrides(cfg, ["--config.model.lora.alpha=4"])
    assert again.model.lora == dataclasses.replace(cfg.model.lora, alpha=4.0)
    assert Config().model.lora.rank == 0  # off by default
    for override, message in [
        ("--config.model.lora.targets=q,x", "config.model.lora.targets='x'"),
        ("--config.model.lora.rnk=8", "did you mean model.lora.rank"),
        ("--config.model.lora.rank=-1", "config.model.lora.rank=-1 must be >= 0"),
        ("--config.model.lora.alpha=0", "config.model.lora.alpha=0.0 must be > 0"),
        ("--config.model.lora.targets=q,q", "names a projection twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            apply_overrides(Config(), [override])


@pytest.fixture(scope="module")
def runs():
    """``(lora run, plain run, base params, adapters with random B, batch, num_nodes)`` on the
    tiny preset, and a hand-built pair batch."""
    cfg = replace(Config(), {"model": {"lora": {"rank": RANK, "alpha": ALPHA},
                                       "attention": "dense"},  # compiles fastest
                             "data": {"format": "pair"}})
    lora_run = setup.build_run(cfg)
    plain_run = setup.build_run(replace(cfg, {"model": {"lora": {"rank": 0}}}))
    (batch, num_nodes), _, _ = pair_batch()
    base = lora_run.initial_params()
    adapters = _random_b(lora_run.trainable(base))
    return lora_run, plain_run, base, adapters, batch, num_nodes


def _spec(run, num_nodes):
    logp = dataclasses.replace(run.spec.logp, num_nodes=num_nodes, chunk_size=8)
    return dataclasses.replace(run.spec, logp=logp, mesh=None)


def _random_b(adapters, seed=0):
    """The adapters with random (nonzero) B, so that the adapted model differs from the base."""
    flat = dict(nnx.to_flat_state(adapters))
    keys = jax.random.split(jax.random.key(seed), len(flat))
    for key, (path, var) in zip(keys, sorted(flat.items())):
        if path[-1] == "b":
            var.set_value(0.05 * jax.random.normal(key, var.get_value().shape))
    return nnx.from_flat_state(flat)


def test_base_is_the_plain_model_and_the_reference(runs):
    lora_run, plain_run, base, adapters, batch, n = runs
    # The base is built as the plain run's model is (same config, same seed): a resumed run
    # rebuilds it, and the reference below is bitwise the plain model's.
    assert lora_run.model_cfg.replace(lora=None) == plain_run.model_cfg
    assert jax.tree.structure(lora_run.base_abstract) == jax.tree.structure(
        plain_run.abstract_params)
    fresh = lora_run.trainable(base)
    assert lora_run.abstract_params.keys() == fresh.keys()
    for path, var in nnx.to_flat_state(fresh):
        assert isinstance(var, nnx.LoRAParam) and path[2].endswith("_lora")
        assert np.any(var.get_value()) == (path[-1] == "a")  # A random, B zero
    spec = _spec(lora_run, n)

    @jax.jit
    def logps(fresh, adapters):
        def step_inputs(adapters):  # (policy, reference) as the step computes them
            inputs = li.batch_inputs(spec.logp, spec.objective, adapters, base, batch)
            return inputs.policy_logps, inputs.reference_logps

        def plain(params):  # the plain (adapter-free) model
            return li.sequence_logps(plain_run.graphdef, params, batch, num_nodes=n,
                                     chunk_size=8).logps

        merged = lora.merged(lora.combine(base, adapters), lora_run.model_cfg.lora)
        return step_inputs(fresh), step_inputs(adapters), plain(base), plain(merged)

    (p0, r0), (policy, reference), want_base, want_merged = jax.tree.map(
        np.asarray, logps(fresh, adapters))
    np.testing.assert_array_equal(p0, r0)  # step 0 (B = 0): the policy is the base exactly
    np.testing.assert_array_equal(r0, want_base)
    # With adapters on, the reference is still bitwise the plain model: adapters off, not zero.
    np.testing.assert_array_equal(reference, want_base)
    assert np.max(np.abs(policy - reference)) > 1e-2
    # The adapted policy is the plain model with the merged weights W + (α/r)·A·B.
    np.testing.assert_allclose(policy, want_merged, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # two forward-backward compiles (the default suite's time budget)
def test_only_the_adapters_are_trained(runs):
    lora_run, plain_run, base, adapters, batch, n = runs
    # The run's trained params and optimiser state are the adapters only (adamw: mu and nu).
    state = lora_run.abstract_state()
    assert state.params.keys() == adapters.keys()
    sizes = [x.size for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert sum(sizes) == 2 * sum(x.size for x in jax.tree.leaves(adapters))
    spec, plain_spec = _spec(lora_run, n), _spec(plain_run, n)
    stats = state_lib.new_state(adapters, optax.sgd(1.0)).stats
    cfg = lora_run.model_cfg.lora

    @jax.jit
    def grads(adapters):
        # What the step differentiates: the loss with respect to its first argument, the
        # adapters; the base weights are the frozen second argument.
        step = jax.value_and_grad(spec.group_losses, has_aux=True)(adapters, base, batch, stats)

        # Independently: the same DPO loss of the plain model with the merged weights
        # W + (α/r)·A·B (its reference the plain model), differentiated through the merge.
        def merged_loss(adapters):
            merged = lora.merged(lora.combine(base, adapters), cfg)
            return plain_spec.group_losses(merged, base, batch, stats)[0]

        return step[0][0], step[1], *jax.value_and_grad(merged_loss)(adapters)

    loss, grad, want_loss, want_grad = grads(adapters)
    assert grad.keys() == adapters.keys()  # gradients exist for the adapters only
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 grad, want_grad)
    assert all(np.any(g) for g in jax.tree.leaves(grad))


def test_merged_export_and_peft_adapter(runs, tmp_path):
    lora_run, plain_run, base, adapters, _, _ = runs
    model = nnx.merge(lora_run.graphdef, lora.combine(base, adapters))
    tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % model.config.vocab_size

    export_hf(model, str(tmp_path / "merged"))
    again = load_hf(str(tmp_path / "merged"), attention="dense")
    assert again.config.lora is None
    logits = jax.jit(lambda a, b: (a(tokens), b(tokens)))(again, model)
    np.testing.assert_allclose(*map(np.asarray, logits), rtol=1e-5, atol=1e-5)

    export_hf(nnx.merge(plain_run.graphdef, base), str(tmp_path / "base"))
    files = lora.export_peft(model, str(tmp_path / "adapter"), base_model_name_or_path="base")
    assert sorted(files) == sorted(os.listdir(tmp_path / "adapter"))
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        config = json.load(f)
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "bias",
                                   "fan_in_fan_out", "use_rslora", "inference_mode",
                                   "base_model_name_or_path", "lora_dropout")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True,
        "base_model_name_or_path": "base", "lora_dropout": 0.0}
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    # Each module's PEFT update B·A, scaled by lora_alpha / r, is merged minus base in HF's
    # own [out, in] layout.
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    plain = load_file(str(tmp_path / "base" / "model.safetensors"))
    cfg = lora_run.model_cfg
    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert len(tensors) == 2 * len(modules) * cfg.num_layers
    for i in range(cfg.num_layers):
        for module in modules:
            name = f"model.layers.{i}.{module}"
            a = tensors[f"base_model.model.{name}.lora_A.weight"]
            b = tensors[f"base_model.model.{name}.lora_B.weight"]
            out, inn = plain[f"{name}.weight"].shape
            assert a.shape == (RANK, inn) and b.shape == (out, RANK)
            assert a.dtype == b.dtype == np.float32
            np.testing.assert_allclose(merged[f"{name}.weight"] - plain[f"{name}.weight"],
                                       ALPHA / RANK * (b @ a), atol=1e-6)


def test_lora_rejects_a_reward_head():
    with pytest.raises(ValueError, match="config.model.lora.rank=4 adapts a causal LM"):
        replace(Config(), {"model": {"lora": {"rank": 4}, "head": "reward"}})


def test_export_merge_needs_a_lora_run(tmp_path, capsys):
    status = cli.main(["export", f"--out={tmp_path}", "--merge", "--untrained"])
    assert status == 2
    assert "--merge folds LoRA adapters" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_dpo_from_the_sft_warmup_improves(tmp_path):
    """configs/lora_dpo_tiny.py from a short SFT warm-up: the held-out DPO loss falls and the
    reward accuracy rises; export writes a PEFT adapter, --merge the merged model."""
    sft = str(tmp_path / "sft")
    loop.train(load_config(os.path.join(CONFIGS, "sft_tiny.py"),
                           ["--config.train.steps=200"]), sft, progress=False)
    config = load_config(os.path.join(CONFIGS, "lora_dpo_tiny.py"),
                         [f"--config.model.init_from={sft}"])
    before = loop.evaluate(config, None, untrained=True)
    workdir = str(tmp_path / "lora")
    summary = loop.train(config, workdir, progress=False)
    after = summary["eval"]
    assert after["eval/loss"] < before["eval/loss"] - 0.1
    assert after["eval/rewards/accuracies"] > before["eval/rewards/accuracies"] + 0.1
    assert cli.main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'adapter'}"]) == 0
    assert os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")
    assert cli.main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'merged'}",
                     "--merge"]) == 0
    assert os.path.exists(tmp_path / "merged" / "config.json")


@pytest.mark.slow
def test_lora_resume_is_exact(tmp_path):
    """A LoRA run resumed from its step-2 checkpoint (the adapters, their optimiser state; the
    base rebuilt from the config) ends with bitwise the adapters of the uninterrupted run."""
    config = load_config(os.path.join(CONFIGS, "lora_dpo_tiny.py"), [
        "--config.train.steps=4", "--config.train.checkpoint_every=2",
        "--config.train.eval_batches=1"])
    workdir = str(tmp_path / "run")
    loop.train(config, workdir, progress=False)
    run = setup.build_run(config)
    straight, _, step = loop.load_params(run, workdir)
    straight = jax.tree.map(np.asarray, straight)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    assert loop.train(config, workdir, progress=False)["resumed_from"] == 2
    resumed, _, again = loop.load_params(run, workdir)
    assert step == again == 4
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
