"""Logical axis names to mesh axes, and sharding constraints on activations.

The mapping is flax's (``flax.linen.logical_to_mesh_axes``): rules are ``(logical_name,
mesh_axes)`` pairs in priority order; a name may have several rules, a later one being the
fallback when an earlier one's mesh axes are already taken in the array; a mesh axis is used at
most once per array (the earlier *rule* wins); names without a rule are replicated.

:func:`resolve_spec` adds what flax's mapping cannot know, the array's shape: a dimension its
mesh axes do not divide falls back to the name's next rule (``(name, None)`` = replicate), and
with no such rule it is an error naming the array, the dimension, the logical and mesh axes
and the sizes. Nothing is replicated silently.

Models name activation axes logically (``("batch", "length", "embed")``) and call
:func:`constrain`. Outside a :func:`use_rules` context this is a no-op, so models run
unchanged on one device; inside it the names are resolved on the mesh and applied with
``jax.lax.with_sharding_constraint``. Activations are derived from arrays whose shardings were
checked already, so an activation dimension the mesh cannot divide is left replicated (logged)
rather than raising while tracing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Sequence

import jax
from flax import linen
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

_state = threading.local()


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
    """Activates ``rules`` (logical name -> mesh axes) on ``mesh`` for :func:`constrain`."""
    prev = getattr(_state, "active", None)
    _state.active = (mesh, tuple((k, v) for k, v in rules))
    try:
        yield
    finally:
        _state.active = prev


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec`` (flax's resolution, shapes unseen).

    >>> logical_to_spec(("batch", "embed"), (("batch", ("data", "fsdp")), ("embed", "fsdp")))
    P(('data', 'fsdp'), None)
    """
    return linen.logical_to_mesh_axes(tuple(names), tuple(tuple(rule) for rule in rules))


def resolve_spec(
    shape: Sequence[int],
    names: Sequence[str | None],
    mesh: Mesh,
    rules: Rules,
    *,
    where: str = "array",
    strict: bool = True,
) -> PartitionSpec:
    """The ``PartitionSpec`` of an array of ``shape`` named ``names`` that ``mesh`` can divide.

    A dimension whose mesh axes do not divide it takes its name's next rule instead (rules
    further down the list; ``(name, None)`` replicates it).

    Args:
        shape: the array's shape.
        names: one logical name (or None) per dimension.
        mesh: the device mesh.
        rules: logical-axis rules in priority order.
        where: what the array is, for errors (``"parameter 'layers/0/attn/q'"``).
        strict: when no rule divides a dimension, raise (True) or replicate it and log (False).

    Raises:
        ValueError: naming ``where``, the dimension, its logical name, the mesh axes and the
            sizes, when ``strict`` and no rule for the name divides the dimension; or when a
            rule names a mesh axis the mesh does not have.
    """
    rules = [tuple(rule) for rule in rules]
    while True:
        spec = logical_to_spec(names, rules)
        for i, (dim, axes, name) in enumerate(zip(shape, spec, names)):
            size = _mesh_size(mesh, axes, name)
            if dim % size == 0:
                continue
            k = next(k for k, (n, a) in enumerate(rules) if n == name and _axes(a) == _axes(axes))
            if any(n == name for n, _ in rules[k + 1:]):
                del rules[k]  # the name's next rule applies
                break
            over = f"axis {axes!r}" if isinstance(axes, str) else f"axes {_axes(axes)}"
            message = (f"{where} dim {i} ({name!r}) of size {dim} cannot be sharded over mesh "
                       f"{over} of size {size}")
            if strict:
                raise ValueError(f"{message}; make it divisible, or allow replicating it with a "
                                 f"later rule ({name!r}, None)")
            log.warning("%s; replicating it", message)
            rules[k] = (name, None)
            break
        else:
            return spec


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrains ``x``'s sharding by logical axis names when rules are active."""
    active = getattr(_state, "active", None)
    if active is None:
        return x
    mesh, rules = active
    spec = resolve_spec(x.shape, names, mesh, rules, where=f"activation{tuple(names)}",
                        strict=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shards(name: str, size: int) -> int:
    """How many ways the active rules split a dimension of ``size`` named ``name`` (1 outside
    :func:`use_rules`, or when the mesh axes do not divide ``size``).

    >>> shards("batch", 8)
    1
    """
    active = getattr(_state, "active", None)
    if active is None:
        return 1
    mesh, rules = active
    spec = resolve_spec((size,), (name,), mesh, rules, where=name, strict=False)
    return _mesh_size(mesh, spec[0], name)


def _axes(axes: MeshAxes) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _mesh_size(mesh: Mesh, axes: MeshAxes, name: str | None) -> int:
    missing = [a for a in _axes(axes) if a not in mesh.shape]
    if missing:
        raise ValueError(f"the rule for {name!r} names mesh axes {missing}, which the mesh "
                         f"{dict(mesh.shape)} does not have")
    return math.prod(mesh.shape[a] for a in _axes(axes))
