"""Multi-process start-up and assembling the global batch from each process's slice.

``maybe_initialize()`` runs ``jax.distributed.initialize`` when the environment says this is one
of several processes, and does nothing on a single host. It must run before anything touches
the devices. The environment it reads, first match wins:

- explicit arguments, or ``JAXPO_COORDINATOR`` (``host:port``) with ``JAXPO_NUM_PROCESSES`` and
  ``JAXPO_PROCESS_ID``, or ``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``;
- a SLURM job step with more than one task (``SLURM_JOB_ID``, ``SLURM_NTASKS``), Open MPI
  (``OMPI_COMM_WORLD_SIZE``), or a multi-host Cloud TPU slice (``TPU_WORKER_HOSTNAMES`` with
  several hosts, or ``MEGASCALE_COORDINATOR_ADDRESS``): JAX detects the cluster itself.

On CPU, cross-process collectives use gloo.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxpo.sharding.rules import batch_shardings, get_rules

log = logging.getLogger(__name__)


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an int") from None
    return None


def _cluster_detected() -> str | None:
    """Names the multi-process cluster the environment describes, if any."""
    if "SLURM_JOB_ID" in os.environ and (_env_int("SLURM_NTASKS", "SLURM_NPROCS") or 1) > 1:
        return "slurm"
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "open mpi"
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "cloud tpu"
    return None


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | list[int] | None = None,
    initialization_timeout: int = 300,
) -> bool:
    """Initialises ``jax.distributed`` when running as one of several processes.

    Args:
        coordinator_address: ``host:port`` of process 0's coordinator; default from the
            environment (see the module docstring).
        num_processes: total number of processes; default from the environment.
        process_id: this process's index in ``[0, num_processes)``; default from the environment.
        local_device_ids: restricts the devices this process uses (passed through).
        initialization_timeout: seconds to wait for every process to join.

    Returns:
        True when running multi-process (initialised now or before), False for a single process
        (nothing done).
    """
    if jax.distributed.is_initialized():
        return True
    address = (
        coordinator_address
        or os.environ.get("JAXPO_COORDINATOR")
        or os.environ.get("JAX_COORDINATOR_ADDRESS")
    )
    if num_processes is None:
        num_processes = _env_int("JAXPO_NUM_PROCESSES", "JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAXPO_PROCESS_ID", "JAX_PROCESS_ID")
    cluster = None if address else _cluster_detected()
    if address is None and cluster is None:
        return False
    if address is not None and (num_processes is None or process_id is None):
        raise ValueError(
            f"multi-process coordinator {address!r} given, but the number of processes and this "
            "process's id are not: set JAXPO_NUM_PROCESSES and JAXPO_PROCESS_ID (or pass "
            "num_processes= and process_id=)"
        )
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is not in [0, num_processes={num_processes})")
    # Only the CPU client reads this; on CPU, cross-process collectives need gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("jax.distributed.initialize: coordinator=%s processes=%s id=%s cluster=%s",
             address, num_processes, process_id, cluster)
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    return True


def make_global_batch(
    local_batch: Mapping[str, Any],
    mesh: Mesh,
    shardings: Mapping[str, NamedSharding] | None = None,
    *,
    rules=None,
) -> dict[str, jax.Array]:
    """Assembles global arrays from each process's rows of the batch.

    Every process calls this with its own slice (the same keys, shapes and dtypes on every
    process); process ``p``'s rows become rows ``[p * n, (p + 1) * n)`` of the global arrays,
    whose leading axis is ``process_count`` times the local one. Scalars are taken as global
    (they must be equal on every process).

    Args:
        local_batch: dict of numpy arrays ``[n, ...]`` (this process's rows).
        mesh: the device mesh.
        shardings: ``NamedSharding`` per key for the *global* arrays; default
            :func:`jaxpo.sharding.rules.batch_shardings` with ``rules`` (default ``fsdp``).
        rules: logical-axis rules used when ``shardings`` is None.

    Returns:
        dict of global ``jax.Array`` s.
    """
    local_batch = {k: np.asarray(v) for k, v in local_batch.items()}
    if shardings is None:
        procs = jax.process_count()
        global_shapes = {
            k: jax.ShapeDtypeStruct((v.shape[0] * procs, *v.shape[1:]) if v.ndim else (), v.dtype)
            for k, v in local_batch.items()
        }
        shardings = batch_shardings(global_shapes, mesh, get_rules(rules or "fsdp"))
    out = {}
    for key, value in local_batch.items():
        if key not in shardings:
            raise KeyError(f"make_global_batch: no sharding for batch key {key!r}")
        global_shape = () if value.ndim == 0 else None  # a scalar is the same everywhere
        out[key] = jax.make_array_from_process_local_data(shardings[key], value, global_shape)
    return out
