"""Device mesh and data placement: a 2-D mesh ``data`` x ``fsdp``.

The batch is split over every device (both axes). The search state's large leaves
(frozen params, scores, masks, optimizer state, flip history) are split over the
``fsdp`` axis along their largest dimension that divides over it, and replicated over
``data`` (:func:`state_sharding`); small or indivisible leaves are replicated. With
``fsdp=1`` every device holds a full copy of the state (plain data parallelism).

Under ``jax.jit`` with these shardings XLA inserts the collectives itself, so
gradients and BatchNorm statistics are computed over the global batch and the
result does not depend on the number of devices or the mesh shape.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
# Leaves with fewer elements than this stay replicated under fsdp: splitting them saves
# little memory and costs a collective each (biases, BatchNorm vectors, scalars).
MIN_SHARDED_SIZE = 2**14


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


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> Mesh:
    """A ``data`` x ``fsdp`` mesh over the first ``num_devices`` devices (default: all).

    ``fsdp`` devices share one copy of the search state, each holding 1/fsdp of every
    large leaf; ``num_devices // fsdp`` such groups split the batch further (data
    parallel). ``fsdp=1`` replicates the state on every device.
    """
    available = len(jax.devices())
    num_devices = num_devices or available
    if not 1 <= num_devices <= available:
        raise ValueError(f'num_devices={num_devices}, but {available} devices are available')
    check_fsdp(fsdp, num_devices)
    return jax.make_mesh(
        (num_devices // fsdp, fsdp),
        (DATA_AXIS, FSDP_AXIS),
        devices=jax.devices()[:num_devices],
        # shardings propagate; no explicit reshards
        axis_types=(jax.sharding.AxisType.Auto, jax.sharding.AxisType.Auto),
    )


def check_fsdp(fsdp: Any, num_devices: int) -> None:
    """``fsdp`` must be an integer >= 1 that divides the ``num_devices`` of the mesh."""
    if isinstance(fsdp, bool) or not isinstance(fsdp, (int, np.integer)) or fsdp < 1:
        raise ValueError(
            f'fsdp={fsdp!r} must be an integer >= 1 (the devices that share one copy of the '
            'search state; 1 = a full copy on every device)'
        )
    if num_devices % fsdp:
        divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
        raise ValueError(
            f'fsdp={fsdp} does not divide the {num_devices} devices of the mesh; choose fsdp '
            f'among {", ".join(map(str, divisors))}, or use a device count that is a multiple '
            f'of {fsdp}'
        )


def fsdp_size(mesh: Mesh) -> int:
    """How many devices share one copy of the state (1 without an ``fsdp`` axis)."""
    return dict(mesh.shape).get(FSDP_AXIS, 1)


def describe(mesh: Mesh) -> str:
    """The mesh's shape in words, e.g. ``'data=2 x fsdp=4'``."""
    return ' x '.join(f'{name}={size}' for name, size in mesh.shape.items())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch dimension (the first) split over every axis of the mesh, so over all devices."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def leaf_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """Where one leaf of the search state lives on a mesh with ``fsdp`` devices on its
    ``fsdp`` axis: split along its largest dimension that ``fsdp`` divides (the first
    such one on a tie), or replicated (``P()``) if it has fewer than
    :data:`MIN_SHARDED_SIZE` elements, no such dimension, or ``fsdp == 1``."""
    if fsdp <= 1 or math.prod(shape) < MIN_SHARDED_SIZE:
        return PartitionSpec()
    candidates = [(size, -axis) for axis, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    axis = -max(candidates)[1]
    return PartitionSpec(*([None] * axis), FSDP_AXIS)


def state_sharding(tree: Any, mesh: Mesh) -> Any:
    """A :class:`NamedSharding` per leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``):
    :func:`leaf_spec` on the mesh's ``fsdp`` axis, replicated over the other axes."""
    fsdp = fsdp_size(mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), fsdp)), tree)


def shard_state(tree: Any, mesh: Mesh) -> Any:
    """Places ``tree`` on the mesh by :func:`state_sharding`: large leaves split over the
    ``fsdp`` axis, the rest replicated (all of it replicated when ``fsdp == 1``).

    Across processes, each process supplies its devices' shards from its own value of
    a leaf (which must be the same everywhere), so no cross-host transfer is needed.
    """
    return _place(tree, state_sharding(tree, mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` on every device of the mesh.

    Across processes, each process supplies its devices' copies from its own value
    of a leaf (which must be the same everywhere), so no cross-host transfer is needed.
    """
    sharding = replicated(mesh)
    return _place(tree, jax.tree.map(lambda _: sharding, tree))


def _place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)``, also across processes (see :func:`replicate`)."""
    if all(s.is_fully_addressable for s in jax.tree.leaves(shardings)):
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """The batch is split over every device of the mesh, so its size must divide over them."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        shape = f' ({describe(mesh)})' if fsdp_size(mesh) > 1 else ''
        raise ValueError(
            f'batch size {global_batch_size} does not divide over {devices} devices{shape}; '
            f'use a multiple of {devices}'
        )


def place_batch(batch: Any, mesh: Mesh) -> Any:
    """A batch (any pytree of arrays) as global arrays split over the mesh's devices
    (:func:`batch_sharding`), from this process's share of it; a batch size that does not
    divide over the devices is refused."""
    sharding = batch_sharding(mesh)

    def one(a):
        a = np.asarray(a)
        if a.ndim:
            check_batch_size(a.shape[0] * jax.process_count(), mesh)
        return jax.make_array_from_process_local_data(sharding, a)

    return jax.tree.map(one, batch)


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """:func:`place_batch` of the arrays of a batch, as a tuple."""
    return tuple(place_batch(arrays, mesh))


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


# ----------------------------------------------------------------------------
# Memory per device.
# ----------------------------------------------------------------------------
def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of ``tree``'s arrays (its shard of each leaf; the largest
    shard where shards differ), from the leaves' shardings."""
    total = 0
    for x in jax.tree.leaves(tree):
        if not isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
            total += np.asarray(x).nbytes
            continue
        sharding = getattr(x, 'sharding', None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * _itemsize(x.dtype)
    return total


def _itemsize(dtype: Any) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # a key: its raw key data
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
        return math.prod(data.shape) * data.dtype.itemsize
    return np.dtype(dtype).itemsize


def step_memory(jitted: Any, *args: Any, state: Any = None) -> dict[str, int]:
    """Per-device bytes of the program ``jitted`` (a ``jax.jit`` function) compiles for
    ``args``: its arguments, outputs, the outputs that reuse donated argument buffers
    (alias), temporaries, and ``peak`` = argument + output - alias + temp; with ``state``
    also ``state``, that tree's bytes per device (:func:`bytes_per_device`).

    The compiled program is the one the next call with such arguments runs (JAX keeps it),
    so this costs no second compilation. Empty when there is no analysis (the backend gives
    none, or ``jitted`` is a plain function).
    """
    if not hasattr(jitted, 'lower'):
        return {}
    analysis = jitted.lower(*args).compile().memory_analysis()
    if analysis is None:
        return {}
    sizes = {
        name: int(getattr(analysis, f'{name}_size_in_bytes', 0))
        for name in ('argument', 'output', 'alias', 'temp')
    }
    sizes['peak'] = sizes['argument'] + sizes['output'] - sizes['alias'] + sizes['temp']
    if state is not None:
        sizes['state'] = bytes_per_device(state)
    return sizes


def format_memory(sizes: dict[str, int]) -> str:
    """:func:`step_memory`'s figures in MiB, one line."""
    if not sizes:
        return 'no memory analysis'
    names = [n for n in ('state', 'argument', 'output', 'alias', 'temp', 'peak') if n in sizes]
    return ', '.join(f'{n} {sizes[n] / 2**20:.1f} MiB' for n in names)
