"""Multi-process start-up and assembling the global batch from each process's slice.

``maybe_initialize()`` runs ``jax.distributed.initialize`` when the environment says this is one
of several processes, and does nothing on a single host. It must run before anything touches
the devices. The environment it reads, first match wins:

- explicit arguments, or ``JAXPO_COORDINATOR`` (``host:port``) with ``JAXPO_NUM_PROCESSES`` and
  ``JAXPO_PROCESS_ID``, or ``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``;
- otherwise JAX's own cluster detection (``jax.distributed.initialize()`` without arguments
  and the cluster plugins it consults: Cloud TPU VM slices through the TPU metadata server or
  GKE's environment, multislice, Kubernetes JobSets, SLURM, Open MPI). jaxpo only asks the same
  plugins whether one applies; a SLURM or Open MPI job of one task stays single-process.

On CPU, cross-process collectives use gloo.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax._src import clusters
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
    """The name of the cluster JAX's ``jax.distributed.initialize()`` would detect, if any.

    The same plugins, in the same order, as JAX's own auto-detection (``ClusterEnv``'s
    registry; the opt-in mpi4py plugin is skipped as JAX skips it). A SLURM or Open MPI job
    of a single process is not a multi-process run.
    """
    for env in clusters.ClusterEnv._cluster_types:  # JAX's plugin registry (private)
        if env.opt_in_only_method or not env.is_env_present():
            continue
        if env in (clusters.SlurmCluster, clusters.OmpiCluster) and env.get_process_count() < 2:
            return None
        return env.name or env.__name__
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
    batch: Mapping[str, Any],
    mesh: Mesh,
    shardings: Mapping[str, NamedSharding] | None = None,
    *,
    rules=None,
) -> dict[str, jax.Array]:
    """Global arrays from the host batch that every process holds in full.

    Every process calls this with the same global batch (the data pipeline builds it the same
    way everywhere). Each addressable device gets exactly the slice its sharding's index says,
    so the rows a process uploads follow the mesh's device order whatever it is: contiguous,
    or processes interleaved as JAX orders large TPU slices. Nothing is compared or gathered
    across processes.

    Args:
        batch: dict of numpy arrays (the global batch; scalars too).
        mesh: the device mesh.
        shardings: ``NamedSharding`` per key; default
            :func:`jaxpo.sharding.rules.batch_shardings` with ``rules`` (default ``fsdp``).
        rules: logical-axis rules used when ``shardings`` is None.

    Returns:
        dict of global ``jax.Array`` s.
    """
    batch = {k: np.asarray(v) for k, v in batch.items()}
    if shardings is None:
        shardings = batch_shardings(batch, mesh, get_rules(rules or "fsdp"))
    out = {}
    for key, value in batch.items():
        if key not in shardings:
            raise KeyError(f"make_global_batch: no sharding for batch key {key!r}")
        out[key] = jax.make_array_from_callback(value.shape, shardings[key],
                                                lambda index, v=value: v[index])
    return out

