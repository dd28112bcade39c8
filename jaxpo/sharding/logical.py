"""Logical-axis constraints for activations.

Models name activation axes logically (``("batch", "length", "embed")``) and call
:func:`constrain`. Outside a :func:`use_rules` context this is a no-op, so models run
unchanged on one device; inside it, the names are mapped to mesh axes by the active rules
and applied with ``jax.lax.with_sharding_constraint``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_state = threading.local()


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
    """Activates ``rules`` (logical name -> mesh axis) on ``mesh`` for :func:`constrain`."""
    prev = getattr(_state, "active", None)
    _state.active = (mesh, tuple((k, v) for k, v in rules))
    try:
        yield
    finally:
        _state.active = prev


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec``; a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        axis = table.get(name) if name is not None else None
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def fit_spec(
    shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, *, where: str = "array"
) -> PartitionSpec:
    """Replicates each dimension of ``spec`` that its mesh axes do not divide (logged)."""
    out = list(spec) + [None] * (len(shape) - len(spec))
    for i, (dim, axes) in enumerate(zip(shape, out)):
        if axes is None:
            continue
        size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        if dim % size:
            log.warning("%s: dim %d of size %d is not divisible by mesh axes %s (size %d); "
                        "replicating it", where, i, dim, axes, size)
            out[i] = None
    return PartitionSpec(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrains ``x``'s sharding by logical axis names when rules are active."""
    active = getattr(_state, "active", None)
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, rules)
    spec = fit_spec(x.shape, spec, mesh, where=f"constrain{tuple(names)}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
