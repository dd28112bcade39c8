"""Everything a run builds from its config before the first step: mesh, rules, tokenizer, model,
objective, optimizers, shardings and the initial parameters.

A run has up to two phases, each with its own optimizer (and schedule) and its own compiled
step: ``sft`` (``train.sft_warmup_steps`` updates of the ``sft`` objective on the best response)
and ``pref`` (``train.steps`` updates of the configured objective). With gradient accumulation
the step runs ``optim.grad_accum_steps`` times per update; ``state.step`` counts step calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpo import losses
from jaxpo.data.tokenize import Tokenizer
from jaxpo.models.config import ModelConfig
from jaxpo.models.hf_io import load_hf
from jaxpo.models.transformer import Transformer
from jaxpo.sharding import get_rules, make_mesh, maybe_initialize
from jaxpo.train import inputs
from jaxpo.train import state as state_lib
from jaxpo.train import step as step_lib
from jaxpo.train.config import build_objective
from jaxpo.train.optim import make_optimizer


@dataclasses.dataclass
class Run:
    """The static parts of a run (see the module docstring)."""

    config: Any
    mesh: Mesh
    rules: Any
    tokenizer: Tokenizer
    model_cfg: ModelConfig
    graphdef: nnx.GraphDef
    abstract_params: Any
    objective: losses.Objective
    hparams: dict[str, Any]
    sft_calls: int  # step calls of the SFT phase
    total_calls: int  # step calls of the whole run
    tx: dict[str, optax.GradientTransformation]  # per phase
    schedule: dict[str, optax.Schedule]
    shardings: dict[str, state_lib.TrainState]  # per phase

    def phase(self, step: int) -> str:
        """The phase of step call ``step`` (0-based)."""
        return "sft" if step < self.sft_calls else "pref"

    def checkpoint_phase(self, step: int) -> str:
        """The phase whose optimizer state a checkpoint taken after ``step`` calls holds."""
        return "sft" if 0 < step <= self.sft_calls else "pref"

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def num_nodes(self) -> int:
        return inputs.node_slots(self.config)

    def initial_params(self) -> Any:
        """The model's initial params (a Hugging Face checkpoint, or the seeded init), sharded."""
        shardings = self.shardings["pref"].params
        if self.config.model.path:
            model = load_hf(self.config.model.path, dtype=self.model_cfg.dtype,
                            param_dtype=self.model_cfg.param_dtype, remat=self.model_cfg.remat)
            return jax.device_put(state_lib.split_model(model)[1], shardings)
        cfg, seed = self.model_cfg, self.config.train.seed

        def init():
            return state_lib.split_model(Transformer(cfg, rngs=nnx.Rngs(params=seed)))[1]

        return jax.jit(init, out_shardings=shardings)()

    def new_state(self, params: Any, phase: str) -> state_lib.TrainState:
        """A fresh state (step 0, new optimizer state of ``phase``) around a copy of ``params``
        (new buffers: ``params`` stay valid when the state is donated)."""
        tx = self.tx[phase]
        return jax.jit(lambda p: state_lib.new_state(jax.tree.map(jnp.copy, p), tx),
                       out_shardings=self.shardings[phase])(params)

    def train_step(self, phase: str, batch_shardings: Any):
        """The compiled step of ``phase``: ``(state, ref_params, batch) -> (state, metrics)``."""
        if phase == "sft":
            objective, hparams, mode = losses.get("sft"), {}, "none"
        else:
            objective, hparams, mode = self.objective, self.hparams, self.config.reference.mode
        accum = self.config.optim.grad_accum_steps
        start = self.sft_calls if phase == "pref" else 0
        schedule = self.schedule[phase]
        ref_shardings = self.shardings["pref"].params if mode == "model" else None
        return step_lib.make_train_step(
            self.graphdef, objective, self.tx[phase],
            lambda step: schedule((step - start) // accum),
            hparams=hparams, reference_mode=mode, num_nodes=self.num_nodes,
            chunk_size=self.config.model.logprob_chunk_size, metrics_beta=self.metrics_beta,
            mesh=self.mesh, rules=self.rules, state_shardings=self.shardings[phase],
            ref_shardings=ref_shardings, batch_shardings=batch_shardings)

    def eval_step(self):
        return step_lib.make_eval_step(
            self.graphdef, self.objective, hparams=self.hparams,
            reference_mode=self.config.reference.mode, num_nodes=self.num_nodes,
            chunk_size=self.config.model.logprob_chunk_size, metrics_beta=self.metrics_beta,
            mesh=self.mesh, rules=self.rules)

    @property
    def metrics_beta(self) -> float:
        """β of the implicit-reward metrics: the configured one, else the objective's default."""
        if self.config.loss.beta is not None:
            return float(self.config.loss.beta)
        found = [h["beta"] for h in _component_hparams(self.objective) if "beta" in h]
        return float(found[0]) if found else 1.0


def _component_hparams(objective: losses.Objective) -> list[dict[str, Any]]:
    if objective.components:
        return [dict(objective.hyperparameters.get(o.name, {})) for o, _ in objective.components]
    return [dict(objective.hyperparameters)]


def build_run(config: Any, *, kind: str | None = None) -> Run:
    """Builds the :class:`Run` of ``config`` (initialises multi-process JAX when configured)."""
    maybe_initialize()
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = get_rules(config.mesh.rules)
    tokenizer = Tokenizer.from_dir(inputs.tokenizer_dir(config))
    model_cfg = inputs.model_config(config, tokenizer)
    objective, hparams = build_objective(config.loss)
    fmt = config.data.format
    step_lib.check_objective(objective, config.reference.mode,
                             kind or (None if fmt == "auto" else fmt))
    if config.reference.mode == "precomputed" and config.data.max_steps > 1:
        raise ValueError("config.reference.mode='precomputed' stores whole-response log-probs; "
                         "with config.data.max_steps > 1 (tree steps) use reference.mode=model")
    if config.reference.mode == "precomputed" and config.train.sft_warmup_steps:
        raise ValueError("config.train.sft_warmup_steps > 0 makes the reference the warmed-up "
                         "policy, which cannot be precomputed; use reference.mode=model")
    graphdef, abstract = state_lib.abstract_model(model_cfg)
    accum = config.optim.grad_accum_steps
    tx, schedule, shardings = {}, {}, {}
    for phase, updates in (("sft", config.train.sft_warmup_steps), ("pref", config.train.steps)):
        tx[phase], schedule[phase] = make_optimizer(config.optim, max(updates, 1))
        shardings[phase] = state_lib.state_shardings(abstract, tx[phase], mesh, rules)
    sft_calls = config.train.sft_warmup_steps * accum
    return Run(config=config, mesh=mesh, rules=rules, tokenizer=tokenizer, model_cfg=model_cfg,
               graphdef=graphdef, abstract_params=abstract, objective=objective,
               hparams=hparams, sft_calls=sft_calls,
               total_calls=sft_calls + config.train.steps * accum, tx=tx, schedule=schedule,
               shardings=shardings)
