"""The device mesh: axes ``("data", "fsdp", "tensor")``, sizes from config, −1 = the rest."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, *, num_devices: int) -> dict:
    """Resolves the axis sizes for ``num_devices`` devices; at most one size may be −1.

    Raises:
        ValueError: naming the field when a size is invalid or the sizes do not fit the devices.

    >>> mesh_shape(data=-1, fsdp=2, tensor=2, num_devices=8)
    {'data': 2, 'fsdp': 2, 'tensor': 2}
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{name} must be a positive int or -1 (the rest), got {size!r}")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh: only one size may be -1 (the rest), got -1 for {rest}")
    product = 1
    for name, size in sizes.items():
        if size == -1:
            continue
        product *= size
        if num_devices % product:
            raise ValueError(
                f"mesh.{name}={size} does not fit: data={data}, fsdp={fsdp}, tensor={tensor} "
                f"needs a multiple of {product} devices, and there are {num_devices}"
            )
    if rest:
        sizes[rest[0]] = num_devices // product
    elif product != num_devices:
        raise ValueError(
            f"mesh: data={data} x fsdp={fsdp} x tensor={tensor} = {product} devices, but there "
            f"are {num_devices}; set one of mesh.data, mesh.fsdp, mesh.tensor to -1 for the rest"
        )
    return sizes


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a ``Mesh`` with axes ``("data", "fsdp", "tensor")`` over ``devices``.

    Args:
        data: data-parallel size (params replicated along it), −1 = the rest.
        fsdp: fully-sharded data-parallel size (batch and params sharded along it), −1 = the rest.
        tensor: tensor-parallel size (mlp, heads, vocab sharded along it), −1 = the rest.
        devices: devices to use; default all of ``jax.devices()`` (every process's).

    Returns:
        A mesh whose axes are all ``AxisType.Auto`` (sharding is propagated by the compiler).

    >>> dict(make_mesh(devices=jax.devices()[:1]).shape)
    {'data': 1, 'fsdp': 1, 'tensor': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(data, fsdp, tensor, num_devices=len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
