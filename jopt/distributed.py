"""Multi-host runs: joining one (`jax.distributed.initialize`) and taking part in it.

Several processes (one per host, or several per host on CPU) train one model
together: process 0 runs a coordinator at ``HOST:PORT``, every process connects
to it, and afterwards ``jax.devices()`` lists the devices of *all* processes, so
the meshes of :mod:`jopt.parallel` span every host. Each process feeds only its
own rows of each global batch (:meth:`jopt.parallel.DataParallel.process_rows`).

The settings come from arguments, else from the environment:

====================  ======================  ===================================
argument              environment             meaning
====================  ======================  ===================================
coordinator_address   ``JOPT_COORDINATOR``    ``HOST:PORT`` of process 0
num_processes         ``JOPT_NUM_PROCESSES``  processes taking part
process_id            ``JOPT_PROCESS_ID``     this process, ``0 .. N-1``
====================  ======================  ===================================

A training loop that is one of several processes logs from process 0 only
(:func:`is_primary_process`) and checkpoints arrays replicated over all processes
(:func:`to_global_arrays`; orbax refuses process-local arrays in a multi-process run).

On CPU, cross-process collectives use gloo (``jax_cpu_collectives_implementation``;
jax 0.10 also offers ``"mpi"``).

Example (two processes on one machine, two CPU devices each)::

    # shell 1                                    # shell 2
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
    jopt train --config configs/fashion_mnist_shard_map.py --workdir runs/mh \\
        --coordinator 127.0.0.1:9876 --num-processes 2 --process-id 0   # ... --process-id 1
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "DistributedConfig",
           "DistributedConfigError", "initialize", "is_primary_process", "resolve",
           "to_global_arrays", "to_local_arrays"]

ENV_COORDINATOR = "JOPT_COORDINATOR"
ENV_NUM_PROCESSES = "JOPT_NUM_PROCESSES"
ENV_PROCESS_ID = "JOPT_PROCESS_ID"


class DistributedConfigError(ValueError):
    """Multi-process settings that cannot work; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Validated settings of a multi-process run.

    Attributes:
      coordinator_address: ``HOST:PORT`` of process 0's coordinator.
      num_processes: processes taking part (>= 2).
      process_id: this process, in ``[0, num_processes)``.
    """

    coordinator_address: str
    num_processes: int
    process_id: int


def _integer(value: int | str | None, name: str, flag: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(
            f"{flag} (or {name}) must be an integer, got {value!r}.") from None


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | str | None = None,
    process_id: int | str | None = None,
    *,
    environ: dict[str, str] | None = None,
) -> DistributedConfig | None:
    """Combines arguments and environment into a checked :class:`DistributedConfig`.

    Arguments win over the environment. Returns ``None`` for a single-process run
    (nothing given, or one process).

    Raises:
      DistributedConfigError: a missing or malformed coordinator address, a missing
        process id, or a process id outside ``[0, num_processes)``; each message
        names the flag and the fix.
    """
    environ = os.environ if environ is None else environ
    coordinator = coordinator_address or environ.get(ENV_COORDINATOR) or None
    count = _integer(num_processes if num_processes is not None
                     else environ.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES, "--num-processes")
    index = _integer(process_id if process_id is not None
                     else environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID, "--process-id")
    if coordinator is None and count is None and index is None:
        return None
    if count is None:
        raise DistributedConfigError(
            "A multi-process run needs --num-processes N (or JOPT_NUM_PROCESSES): the "
            "number of processes that take part.")
    if count < 1:
        raise DistributedConfigError(f"--num-processes must be >= 1, got {count}.")
    if index is not None and not 0 <= index < count:
        raise DistributedConfigError(
            f"--process-id {index} is out of range for --num-processes {count}: give each "
            f"process a different id in 0 .. {count - 1} (process 0 runs the coordinator).")
    if count == 1:
        return None
    if coordinator is None:
        raise DistributedConfigError(
            f"--num-processes {count} needs --coordinator HOST:PORT (or JOPT_COORDINATOR): "
            "the address where process 0 listens, reachable from every process, e.g. "
            "--coordinator 10.0.0.1:9876.")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedConfigError(
            f"--coordinator {coordinator!r} is not HOST:PORT (e.g. 127.0.0.1:9876 or "
            "node0.cluster:9876).")
    if index is None:
        raise DistributedConfigError(
            f"--num-processes {count} needs --process-id I (or JOPT_PROCESS_ID) with I in "
            f"0 .. {count - 1}, different in every process.")
    return DistributedConfig(coordinator, count, index)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | str | None = None,
    process_id: int | str | None = None,
    *,
    local_device_ids: int | list[int] | None = None,
    initialization_timeout: int = 300,
) -> DistributedConfig | None:
    """Joins a multi-process run (:func:`jax.distributed.initialize`), if one is asked for.

    Call it first, before anything else touches JAX's devices. Settings as in
    :func:`resolve`; a single-process run is left alone.

    Args:
      coordinator_address: ``HOST:PORT`` of process 0.
      num_processes: processes taking part.
      process_id: this process's id.
      local_device_ids: restrict this process to some of its local devices.
      initialization_timeout: seconds to wait for all processes to connect.

    Returns:
      The settings used, or ``None`` for a single-process run.

    Raises:
      DistributedConfigError: see :func:`resolve`.
    """
    config = resolve(coordinator_address, num_processes, process_id)
    if config is None:
        return None
    # The default since jax 0.5, set explicitly so a user's flag of another value
    # (or an older default of no CPU collectives) cannot leave CPU processes unable
    # to reduce across each other.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    return config


def is_primary_process() -> bool:
    """Whether this process writes a multi-process run's logs (process 0; always, alone)."""
    return jax.process_index() == 0


def to_global_arrays(tree: Any) -> Any:
    """Each process's identical copy of ``tree`` as arrays replicated over all processes.

    What orbax needs to checkpoint a multi-process run (it refuses process-local
    arrays there); in a single process ``tree`` is returned as it is.
    """
    if jax.process_count() == 1:
        return tree
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("replica",)), P())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, np.asarray(x.addressable_data(0))), tree)


def to_local_arrays(tree: Any, like: Any) -> Any:
    """The inverse of :func:`to_global_arrays`: this process's copy, placed like ``like``."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(lambda x, y: jax.device_put(x.addressable_data(0), y.sharding),
                        tree, like)
