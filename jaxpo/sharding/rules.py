"""Logical-axis rules as data, and the shardings they give the train state and the batch.

A rule maps a logical axis name (what models write: ``embed``, ``mlp``, ``heads``,
``kv_heads``, ``head_dim``, ``vocab``, ``batch``, ``length``) to a mesh axis, a tuple of mesh
axes, or None (replicated). Names without a rule are replicated. Rules are in priority order
and resolved by flax (see :mod:`jaxpo.sharding.logical`): a mesh axis is used at most once per
array, the earlier rule winning, and a name's later rules are its fallbacks.

No silent replication: a parameter, optimizer-state or batch dimension whose mesh axes do not
divide it is an error naming the array, the dimension, the logical and mesh axes and the sizes,
unless a later rule for the same name says what to do instead. To let a parameter axis fall
back to replication, add ``(name, None)`` after its rule; e.g. GQA models with fewer key/value
heads than the ``tensor`` axis::

    rules = get_rules("fsdp_tp") + (("kv_heads", None),)  # e.g. 8 kv heads, tensor=16

A fallback may also be a smaller sharding, e.g. ``("vocab", "tensor"), ("vocab", "fsdp")``.

Presets:

- ``fsdp`` (default): parameters sharded along ``embed`` over ``fsdp``; batch over
  ``("data", "fsdp")``. ZeRO-3 style; ``tensor`` unused.
- ``dp``: parameters replicated; batch over ``("data", "fsdp")``.
- ``fsdp_tp``: ``fsdp`` plus ``mlp``, ``heads``, ``kv_heads``, ``vocab`` over ``tensor``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpo.sharding.logical import Rules, resolve_spec

BATCH_AXES = ("data", "fsdp")

FSDP: Rules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
)
DP: Rules = (("batch", BATCH_AXES),)
FSDP_TP: Rules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
)
PRESETS: dict[str, Rules] = {"fsdp": FSDP, "dp": DP, "fsdp_tp": FSDP_TP}


def get_rules(name_or_rules: str | Rules = "fsdp") -> Rules:
    """Returns a preset's rules by name, or checks and returns explicit rules.

    >>> get_rules("fsdp_tp")[2]
    ('mlp', 'tensor')
    """
    if isinstance(name_or_rules, str):
        if name_or_rules not in PRESETS:
            raise ValueError(
                f"unknown sharding rules {name_or_rules!r}; presets: {sorted(PRESETS)}"
            )
        return PRESETS[name_or_rules]
    return tuple(_check_rule(rule) for rule in name_or_rules)


def _check_rule(rule: Any) -> tuple[str, str | tuple[str, ...] | None]:
    """``(name, axes)`` with list axes made tuples; anything else is a ``ValueError``."""
    if isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str):
        name, axes = rule
        axes = tuple(axes) if isinstance(axes, list) else axes
        if axes is None or isinstance(axes, str) or (
                isinstance(axes, tuple) and all(isinstance(a, str) for a in axes)):
            return name, axes
    raise ValueError(f"a sharding rule is (logical_name, mesh_axis | (mesh_axes...) | None), "
                     f"got {rule!r}")


def named_sharding(
    shape: Sequence[int],
    names: Sequence[str | None] | None,
    mesh: Mesh,
    rules: Rules,
    *,
    where: str = "array",
) -> NamedSharding:
    """The ``NamedSharding`` of an array of ``shape`` whose axes are named ``names``.

    A dimension that its mesh axes do not divide takes the name's next rule, or raises a
    ``ValueError`` naming ``where`` (see the module docstring).

    >>> mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
    >>> named_sharding((8, 4), ("vocab", "embed"), mesh, FSDP).spec
    P(None, 'fsdp')
    """
    if names is None:
        return NamedSharding(mesh, PartitionSpec())
    if len(names) != len(shape):
        raise ValueError(
            f"{where}: {len(names)} logical axis names {tuple(names)} for shape {tuple(shape)}"
        )
    return NamedSharding(mesh, resolve_spec(shape, names, mesh, rules, where=where))


def state_shardings(tree: Any, mesh: Mesh, rules: Rules, *, params: Any = None) -> Any:
    """Shardings for a train state: nnx Variables by their logical names, the rest by path.

    Works on concrete or abstract (``nnx.eval_shape``) states. Each ``nnx.Variable`` is sharded
    by the logical axis names in its ``out_sharding`` metadata (what ``nnx.with_partitioning``
    sets; ``nnx.Optimizer`` copies it to the moments). A plain array leaf whose key path ends
    with the path of a leaf of ``params`` and has its shape (e.g. ``tx.init(params)``'s
    ``mu``/``nu``) gets that leaf's sharding; every other leaf is replicated.

    Args:
        tree: pytree holding nnx ``State``s/``Variable``s and/or arrays.
        mesh: the device mesh.
        rules: logical-axis rules (:func:`get_rules`).
        params: optional pytree of nnx Variables whose shardings optimizer leaves mirror.

    Returns:
        A pytree like ``tree`` with a ``NamedSharding`` in place of each array (inside the
        same Variables), usable as ``jax.jit`` in/out shardings and for ``jax.device_put``.
    """
    by_path = {}
    if params is not None:
        for path, leaf in _leaves_with_path(params):
            by_path[_path_key(path)] = (_shape(leaf), _names(leaf))

    def one(path, leaf):
        kind = "parameter" if isinstance(leaf, nnx.Param) else "state array"
        where = f"{kind} '{'/'.join(_path_key(path))}'"
        shape, names = _shape(leaf), _names(leaf)
        if names is None and by_path:
            key = _path_key(path)
            for n in range(len(key), 0, -1):
                hit = by_path.get(key[-n:])
                if hit is not None and hit[0] == shape:
                    names = hit[1]
                    break
        sharding = named_sharding(shape, names, mesh, rules, where=where)
        return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)
    return jax.tree_util.tree_unflatten(treedef, [one(p, leaf) for p, leaf in flat])


def param_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings of an nnx parameter ``State`` (or a Module) from its logical axis names."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    return state_shardings(state, mesh, rules)


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules: Rules) -> dict:
    """Shardings of a batch dict: leading axis by the ``batch`` rule, scalars replicated.

    A leading dimension the batch's mesh axes do not divide is a ``ValueError``, e.g.
    "batch array 'tokens' dim 0 ('batch') of size 6 cannot be sharded over mesh axes
    ('data', 'fsdp') of size 4".

    >>> mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
    >>> batch_shardings({"tokens": np.zeros((4, 8))}, mesh, FSDP)["tokens"].spec
    P(('data', 'fsdp'), None)
    """
    out = {}
    for key, value in batch.items():
        shape = _shape(value)
        names = ("batch",) + (None,) * (len(shape) - 1) if shape else None
        out[key] = named_sharding(shape, names, mesh, rules, where=f"batch array {key!r}")
    return out


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _leaves_with_path(tree: Any):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]


def _shape(leaf: Any) -> tuple[int, ...]:
    if isinstance(leaf, nnx.Variable):
        leaf = leaf.get_value()
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def _names(leaf: Any) -> tuple[str | None, ...] | None:
    """Logical axis names of a Variable (``out_sharding``; older flax: ``sharding``)."""
    if not isinstance(leaf, nnx.Variable):
        return None
    metadata = leaf.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = metadata.get(key)
        if names:
            return tuple(names)
    return None


def _path_key(path) -> tuple[str, ...]:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return tuple(parts)
