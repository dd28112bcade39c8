"""The train state and its shardings.

The policy is an NNX module split once into a static ``graphdef`` and a params pytree; the step
merges them back inside ``jax.jit``. :class:`TrainState` holds everything the step updates (and
donates); the frozen reference params live outside it, so they are never donated.

Parameter shardings come from the logical axis names the model attaches to each parameter,
mapped to mesh axes by the configured rules; optimizer moments shard like their parameter.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxpo import sharding
from jaxpo.models.config import ModelConfig
from jaxpo.models.transformer import Transformer
from jaxpo.sharding.logical import Rules


class TrainState(NamedTuple):
    """What one train step reads and replaces (a pytree; donated to the step).

    Attributes:
      step: int32 ``[]``, optimiser updates taken (skipped ones included).
      params: the policy parameters (an ``nnx.State`` of ``nnx.Param``).
      opt_state: the optax state (its ``apply_if_finite`` part counts skipped updates).
      stats: running statistics some objectives read, float32 scalars: ``reward_mean`` and
        ``reward_count`` (BCO's δ).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    stats: dict[str, jax.Array]


def split_model(model: Transformer) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` of a model whose only state is ``nnx.Param``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the model has non-parameter state {list(rest.keys())}; "
                         "the trainer only handles nnx.Param")
    return graphdef, params


def new_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Step 0, empty statistics, and a fresh optimizer state for ``params``."""
    stats = {"reward_mean": jnp.zeros((), jnp.float32), "reward_count": jnp.zeros((), jnp.float32)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      stats=stats)


def state_shardings(abstract_params: Any, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Rules) -> TrainState:
    """The :class:`TrainState` of ``NamedSharding`` s for params shaped like ``abstract_params``:
    params by their logical axis names, optimizer moments like their parameter, scalars
    replicated (see :func:`jaxpo.sharding.state_shardings`)."""
    abstract = jax.eval_shape(lambda p: new_state(p, tx), abstract_params)
    return sharding.state_shardings(abstract, mesh, rules, params=abstract_params)


def abstract_model(model_cfg: ModelConfig) -> tuple[nnx.GraphDef, Any]:
    """``(graphdef, abstract params)`` without allocating the weights."""
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    return split_model(abstract)


def copy_params(params: Any, shardings: Any) -> Any:
    """A separate copy of ``params`` (new buffers, same shardings): the frozen reference."""
    return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)


def count_params(params: Any) -> int:
    """Number of scalar parameters."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
