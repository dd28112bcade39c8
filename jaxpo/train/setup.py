"""Everything a run builds from its config before the first step: mesh, rules, tokenizer, model,
objective, optimiser, shardings, the step spec and the initial parameters.

    run = build_run(config)          # checks the config against the objective, once
    params = run.initial_params()    # model.init_from, model.path or the seeded init
    state = run.new_state(run.trainable(params))  # with LoRA: fresh adapters on the base

:func:`check` is the one place where the objective is checked against the reference mode and
the data kind.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxpo import losses
from jaxpo.config import Config
from jaxpo.data.tokenize import Tokenizer
from jaxpo.models import lora, preset_names
from jaxpo.models.config import ModelConfig
from jaxpo.models.hf_io import load_hf_params
from jaxpo.models.transformer import Transformer
from jaxpo.sharding import get_rules, make_mesh, maybe_initialize, param_shardings
from jaxpo.sharding.logical import Rules
from jaxpo.train import inputs
from jaxpo.train import state as state_lib
from jaxpo.train.checkpoint import Checkpointer, abstract_like
from jaxpo.train.loss_inputs import LogpSpec
from jaxpo.train.optim import make_optimizer
from jaxpo.train.step import StepSpec, make_eval_step, make_train_step


def build_objective(config: Config) -> tuple[losses.Objective, dict[str, Any]]:
    """The configured objective and its hyperparameter overrides (errors name the field)."""
    loss = config.loss
    try:
        return losses.build(loss.name, hparams=loss.hyperparameters(), modifier=loss.modifier)
    except ValueError as e:
        raise ValueError(f"config.loss: {e}") from None


def check(config: Config, objective: losses.Objective) -> None:
    """Raises ``ValueError`` (naming the config fields) when the run cannot work as configured:
    an unknown model preset, an objective without the reference or the data kind it needs."""
    if not config.model.path and not config.model.init_from and (
            config.model.preset not in preset_names()):
        raise ValueError(f"config.model.preset={config.model.preset!r} is not a model preset; "
                         f"choose from {preset_names()} or set config.model.path")
    reward_model = "rewards" in objective.needs
    if reward_model != (config.model.head == "reward"):
        want = "reward" if reward_model else "lm"
        raise ValueError(
            f"config.loss.name={objective.name!r} trains "
            f"{'a reward model' if reward_model else 'a causal LM'}, but config.model.head="
            f"{config.model.head!r}; set config.model.head={want}"
            + ("" if reward_model else " (or config.loss.name=bradley_terry)"))
    if reward_model and (objective.components or config.loss.modifier):
        raise ValueError(f"config.loss.name={config.loss.name!r}, config.loss.modifier="
                         f"{config.loss.modifier!r}: a reward-model objective is used alone")
    mode = config.reference.mode
    if objective.needs_reference and mode == "none":
        raise ValueError(
            f"config.loss.name={objective.name!r} needs a reference, but "
            "config.reference.mode='none'; set config.reference.mode=model (or precomputed), "
            "or choose a reference-free loss (simpo, orpo, cpo, triple_po, pro)")
    if objective.level == "token" and objective.needs_reference and mode != "model":
        raise ValueError(
            f"config.loss.name={objective.name!r} is token-level: it needs the reference "
            f"model's per-token distributions, but config.reference.mode={mode!r}; set "
            "config.reference.mode=model")
    if "kto_kl" in objective.needs and config.loss.kto_kl == "mismatched" and mode != "model":
        raise ValueError(
            f"config.loss.kto_kl='mismatched' runs the reference model on mismatched pairs, but "
            f"config.reference.mode={mode!r}; set config.loss.kto_kl=matched (the batch's own "
            "pairs) or config.reference.mode=model")
    if objective.needs_reference and mode == "precomputed" and config.data.max_steps > 1:
        raise ValueError("config.reference.mode='precomputed' stores whole-response log-probs; "
                         "with config.data.max_steps > 1 (tree steps) use reference.mode=model")
    kind = config.data.format
    if kind != "auto" and kind not in objective.kinds:
        raise ValueError(f"config.data.format={kind!r} is not supported by config.loss.name="
                         f"{objective.name!r}; it trains on {list(objective.kinds)}")


@dataclasses.dataclass(frozen=True)
class Run:
    """The static parts of a run (see the module docstring)."""

    config: Config
    mesh: Mesh
    rules: Rules
    tokenizer: Tokenizer
    model_cfg: ModelConfig
    abstract_params: Any
    spec: StepSpec
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: state_lib.TrainState
    # With LoRA (model.lora.rank > 0) the trained params (abstract_params, state_shardings)
    # are the adapters; these are the frozen base weights' abstract params and shardings.
    base_abstract: Any = None
    base_shardings: Any = None

    @property
    def graphdef(self) -> nnx.GraphDef:
        """The policy's structure (the adapted model with LoRA)."""
        return self.spec.logp.graphdef

    @property
    def lora(self) -> bool:
        """Whether the run trains LoRA adapters on frozen base weights."""
        return self.model_cfg.lora is not None

    @property
    def frozen_initial(self) -> bool:
        """Whether the step takes the initial weights as its frozen argument: the reference
        model, or LoRA's base weights (which are also its reference, adapters off)."""
        return self.reference_mode == "model" or self.lora

    @property
    def objective(self) -> losses.Objective:
        return self.spec.objective

    @property
    def reference_mode(self) -> str:
        """The reference actually used: ``none`` when the objective needs none."""
        return self.spec.logp.reference_mode

    @property
    def num_nodes(self) -> int:
        return self.spec.logp.num_nodes

    @property
    def mismatched_pairs(self) -> bool:
        """Whether batches carry mismatched pairs (KTO's reference point, ``loss.kto_kl``)."""
        return self.spec.logp.mismatched_kl

    @property
    def label_mapping(self) -> str:
        """``data.label_mapping``, else the objective's own (``minmax`` when it has none)."""
        return self.config.data.label_mapping or self.objective.labels or "minmax"

    def initial_params(self) -> Any:
        """The initial model's params, sharded: ``model.init_from``'s newest checkpoint, else
        the Hugging Face checkpoint in ``model.path``, else the seeded init. With LoRA these
        are the frozen base weights (see :meth:`trainable`)."""
        abstract, shardings = self.abstract_params, self.state_shardings.params
        cfg, seed = self.model_cfg, self.config.train.seed
        if self.lora:
            abstract, shardings = self.base_abstract, self.base_shardings
            cfg = cfg.replace(lora=None)
        m = self.config.model
        if m.init_from:
            return _params_of_run(m.init_from, abstract_like(abstract, shardings))
        if m.path:  # each device reads only its shards from the memory-mapped files
            return load_hf_params(m.path, cfg, shardings)

        def init():
            return state_lib.split_model(Transformer(cfg, rngs=nnx.Rngs(params=seed)))[1]

        return jax.jit(init, out_shardings=shardings)()

    def trainable(self, initial: Any) -> Any:
        """The trained params at step 0: ``initial`` itself, or with LoRA fresh adapters (``A``
        drawn with ``train.seed``, ``B`` zero: the policy starts as the base model exactly)."""
        if not self.lora:
            return initial
        cfg, seed = self.model_cfg, self.config.train.seed

        def init():  # the base weights drawn here are unused, and compiled away
            model = Transformer(cfg, rngs=nnx.Rngs(params=seed, lora=seed))
            return lora.split(state_lib.split_model(model)[1])[1]

        return jax.jit(init, out_shardings=self.state_shardings.params)()

    def reference_params(self, params: Any) -> Any:
        """The step's frozen argument: the initial params ``params`` for
        ``reference_mode="model"`` or LoRA (the donated train state does not own them:
        :meth:`new_state` copies), else None."""
        return params if self.frozen_initial else None

    def new_state(self, params: Any) -> state_lib.TrainState:
        """A fresh state (step 0, new optimizer state) around a copy of ``params`` (new
        buffers: ``params`` stay valid when the state is donated)."""
        return jax.jit(lambda p: state_lib.new_state(jax.tree.map(jnp.copy, p), self.tx),
                       out_shardings=self.state_shardings)(params)

    def abstract_state(self) -> state_lib.TrainState:
        """The state's structure with shardings (for restoring a checkpoint)."""
        abstract = jax.eval_shape(lambda p: state_lib.new_state(p, self.tx), self.abstract_params)
        return abstract_like(abstract, self.state_shardings)

    def train_step(self, batch_shardings: Any = None):
        """The compiled step: ``(state, ref_params, batch) -> (state, metrics)``."""
        ref_shardings = (self.base_shardings if self.lora else
                         self.state_shardings.params if self.reference_mode == "model" else None)
        return make_train_step(self.spec, self.tx, schedule=self.schedule,
                               state_shardings=self.state_shardings,
                               ref_shardings=ref_shardings, batch_shardings=batch_shardings)

    def eval_step(self):
        """The compiled eval step: ``(params, ref_params, batch) -> metrics``."""
        return make_eval_step(self.spec)


def _params_of_run(workdir: str, abstract_params: Any) -> Any:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise ValueError(f"config.model.init_from={workdir!r}: no checkpoints in that workdir")
    ckpt = Checkpointer(workdir)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ValueError(f"config.model.init_from={workdir!r}: no checkpoint in that workdir")
        stored = ckpt.read_json(step, "config") or {}
        if stored.get("model", {}).get("lora", {}).get("rank"):
            raise ValueError(
                f"config.model.init_from={workdir!r} is a LoRA run (its checkpoints hold only "
                "adapters); write its merged model with `jaxpo export --merge --workdir="
                f"{workdir} --out=DIR` and start from config.model.path=DIR")
        stored_head = stored.get("model", {}).get("head", "lm")
        wants_reward = "score" in abstract_params
        if stored_head == "reward" and not wants_reward:
            raise ValueError(f"config.model.init_from={workdir!r} is a reward model "
                             "(model.head=reward): a causal LM cannot start from it")
        if wants_reward and stored_head != "reward":
            # A reward model from a causal LM run: its decoder, and a zero score head so that
            # every reward starts at 0 (the LM's unembedding is not read).
            flat = dict(nnx.to_flat_state(abstract_params))
            score = flat.pop(("score",))
            params = ckpt.restore_params(step, nnx.from_flat_state(flat), strict=False)
            zeros = jax.jit(lambda: jnp.zeros(score.shape, score.dtype),
                            out_shardings=score.sharding)()
            flat = dict(nnx.to_flat_state(params))
            flat[("score",)] = score.replace(zeros)
            return nnx.from_flat_state(flat)
        return ckpt.restore_params(step, abstract_params)
    finally:
        ckpt.close()


def build_run(config: Config) -> Run:
    """Builds the :class:`Run` of ``config`` (initialises multi-process JAX when configured)."""
    objective, hparams = build_objective(config)
    check(config, objective)
    maybe_initialize()
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = get_rules(config.mesh.rules)
    tokenizer = Tokenizer.from_dir(inputs.tokenizer_dir(config))
    model_cfg = inputs.model_config(config, tokenizer)
    graphdef, abstract = state_lib.abstract_model(model_cfg)
    base_graphdef = base_abstract = base_shardings = None
    if model_cfg.lora is not None:  # train the adapters; the base weights are frozen
        base_graphdef, base_abstract = state_lib.abstract_model(model_cfg.replace(lora=None))
        abstract = lora.split(abstract)[1]
        base_shardings = param_shardings(base_abstract, mesh, rules)
    # fp32 master weights whenever a trained parameter is stored in less than fp32.
    low_precision = any(jnp.dtype(x.dtype).itemsize < 4 for x in jax.tree.leaves(abstract))
    tx, schedule = make_optimizer(config.optim, max(config.train.steps, 1),
                                  master_weights=low_precision)
    mode = config.reference.mode if objective.needs_reference else "none"
    logp = LogpSpec(graphdef, num_nodes=inputs.node_slots(config),
                    chunk_size=config.model.logprob_chunk_size, reference_mode=mode,
                    mismatched_kl=("kto_kl" in objective.needs
                                   and config.loss.kto_kl == "mismatched"),
                    base_graphdef=base_graphdef)
    spec = StepSpec(logp=logp, objective=objective, hparams=hparams,
                    metrics_beta=losses.metrics_beta(objective, hparams), mesh=mesh, rules=rules)
    return Run(config=config, mesh=mesh, rules=rules, tokenizer=tokenizer, model_cfg=model_cfg,
               abstract_params=abstract, spec=spec, tx=tx, schedule=schedule,
               state_shardings=state_lib.state_shardings(abstract, tx, mesh, rules),
               base_abstract=base_abstract, base_shardings=base_shardings)
