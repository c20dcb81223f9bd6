"""Device mesh and data placement: the batch is split over the 'data' axis, state replicated.

Under ``jax.jit`` with these shardings XLA inserts the collectives itself, so
gradients and BatchNorm statistics are computed over the global batch and the
result does not depend on the number of devices.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def initialize_distributed(
    coordinator_address: str = '',
    num_processes: int = 0,
    process_id: int = -1,
    cpu_collectives: str = '',
) -> None:
    """Joins this process to a multi-process run; call it before any other JAX use.

    Empty / 0 / -1 arguments are left to JAX to detect (Cloud TPU, SLURM, Open MPI).
    ``cpu_collectives='gloo'`` lets processes on CPUs (e.g. tests on one machine) talk.
    """
    if cpu_collectives:
        jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
    kwargs: dict[str, Any] = {}
    if coordinator_address:
        kwargs['coordinator_address'] = coordinator_address
    if num_processes:
        kwargs['num_processes'] = num_processes
    if process_id >= 0:
        kwargs['process_id'] = process_id
    jax.distributed.initialize(**kwargs)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D data-parallel mesh over the first ``num_devices`` devices (default: all)."""
    available = len(jax.devices())
    num_devices = num_devices or available
    if not 1 <= num_devices <= available:
        raise ValueError(f'num_devices={num_devices}, but {available} devices are available')
    return jax.make_mesh(
        (num_devices,),
        (DATA_AXIS,),
        devices=jax.devices()[:num_devices],
        axis_types=(jax.sharding.AxisType.Auto,),  # shardings propagate; no explicit reshards
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` on every device of the mesh.

    Across processes, each process supplies its devices' copies from its own value
    of a leaf (which must be the same everywhere), so no cross-host transfer is needed.
    """
    sharding = replicated(mesh)
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise ValueError(
            f'batch size {global_batch_size} does not divide over {devices} devices; use a '
            f'multiple of {devices}'
        )


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Global arrays split on the data axis, from this process's share of the batch."""
    sharding = batch_sharding(mesh)
    return tuple(jax.make_array_from_process_local_data(sharding, a) for a in arrays)


def prefetch_to_mesh(
    batches: Iterable[tuple[np.ndarray, ...]], mesh: Mesh, size: int = 2
) -> Iterator[tuple[jax.Array, ...]]:
    """The host batches sharded over the mesh, ``size`` of them in flight: while a step runs
    on batch k, batches k+1 .. k+size-1 are already being copied to the devices."""
    if size < 1:
        raise ValueError(f'prefetch size={size} must be >= 1')
    batches = iter(batches)
    queue = collections.deque(shard_batch(mesh, *b) for b in itertools.islice(batches, size))
    while queue:
        yield queue.popleft()
        queue.extend(shard_batch(mesh, *b) for b in itertools.islice(batches, 1))


def to_host(tree: Any) -> Any:
    """numpy copies of a pytree's arrays, also when they span several processes.

    Replicated arrays are read from a local replica; arrays split across processes
    are gathered.
    """

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
