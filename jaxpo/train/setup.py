"""Everything a run builds from its config before the first step: mesh, rules, tokenizer, model,
objective, optimiser, shardings, the step spec and the initial parameters.

    run = build_run(config)          # checks the config against the objective, once
    params = run.initial_params()    # model.init_from, model.path or the seeded init
    state = run.new_state(params)

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
from jaxpo.models import preset_names
from jaxpo.models.config import ModelConfig
from jaxpo.models.hf_io import load_hf_params
from jaxpo.models.transformer import Transformer
from jaxpo.sharding import get_rules, make_mesh, maybe_initialize
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

    @property
    def graphdef(self) -> nnx.GraphDef:
        return self.spec.logp.graphdef

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
        """The policy's initial params, sharded: ``model.init_from``'s newest checkpoint, else
        the Hugging Face checkpoint in ``model.path``, else the seeded init."""
        shardings = self.state_shardings.params
        m = self.config.model
        if m.init_from:
            return _params_of_run(m.init_from, abstract_like(self.abstract_params, shardings))
        if m.path:  # each device reads only its shards from the memory-mapped files
            return load_hf_params(m.path, self.model_cfg, shardings)
        cfg, seed = self.model_cfg, self.config.train.seed

        def init():
            return state_lib.split_model(Transformer(cfg, rngs=nnx.Rngs(params=seed)))[1]

        return jax.jit(init, out_shardings=shardings)()

    def reference_params(self, params: Any) -> Any:
        """The frozen reference for ``reference_mode="model"`` (the initial policy params, which
        the donated train state no longer owns: :meth:`new_state` copies them), else None."""
        return params if self.reference_mode == "model" else None

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
        ref_shardings = self.state_shardings.params if self.reference_mode == "model" else None
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
    tx, schedule = make_optimizer(config.optim, max(config.train.steps, 1))
    mode = config.reference.mode if objective.needs_reference else "none"
    logp = LogpSpec(graphdef, num_nodes=inputs.node_slots(config),
                    chunk_size=config.model.logprob_chunk_size, reference_mode=mode,
                    mismatched_kl=("kto_kl" in objective.needs
                                   and config.loss.kto_kl == "mismatched"))
    spec = StepSpec(logp=logp, objective=objective, hparams=hparams,
                    metrics_beta=losses.metrics_beta(objective, hparams), mesh=mesh, rules=rules)
    return Run(config=config, mesh=mesh, rules=rules, tokenizer=tokenizer, model_cfg=model_cfg,
               abstract_params=abstract, spec=spec, tx=tx, schedule=schedule,
               state_shardings=state_lib.state_shardings(abstract, tx, mesh, rules))
