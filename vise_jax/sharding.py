"""Device meshes, and process-local rows turned into one global array sharded by rows.

Every data-parallel job here (embedding, k-means, training) splits rows over all devices of the
mesh: the 'data' axis and, for training with large heads, an 'fsdp' axis that also shards
parameters. Rows therefore shard over both axes together.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vise_jax.errors import InputError

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
ROW_AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all devices of all processes).

    `data=-1` takes every device that `fsdp` leaves. Axes are Auto: XLA propagates shardings
    through the data-parallel code, so no op needs an explicit output sharding.
    """
    devices = list(devices if devices is not None else jax.devices())
    if fsdp < 1 or len(devices) % fsdp:
        raise InputError(f'mesh.fsdp={fsdp} must divide the {len(devices)} devices')
    if data == -1:
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise InputError(f'mesh data={data} x fsdp={fsdp} does not match {len(devices)} devices')
    return jax.make_mesh((data, fsdp), ROW_AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over every device of the mesh; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(ROW_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def num_row_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]


def put_rows(local_rows: np.ndarray, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    """Assembles every process's rows into one global array sharded by rows.

    Row counts need not divide the device count, nor be equal across processes: each process pads
    its rows to a common size with zeros. Returns (rows, weights), where weights is 1.0 for real
    rows and 0.0 for padding, so reductions can ignore the padding.

    Rows that need no padding are not copied on the host, and on CPU the device array then
    shares `local_rows`' memory: do not write to `local_rows` while the result is in use.
    """
    local_rows = np.asarray(local_rows)
    local_devices = len(mesh.local_devices)
    largest = int(gather_over_processes(np.array(local_rows.shape[0])).max())
    per_process = max(1, -(-largest // local_devices)) * local_devices
    if local_rows.shape[0] == per_process:   # nothing to pad: spare a copy of the rows
        padded = local_rows
    else:
        padded = np.zeros((per_process, *local_rows.shape[1:]), local_rows.dtype)
        padded[:local_rows.shape[0]] = local_rows
    weights = np.zeros(per_process, np.float32)
    weights[:local_rows.shape[0]] = 1.0
    sharding = row_sharding(mesh)
    global_rows = per_process * jax.process_count()
    return (
        jax.make_array_from_process_local_data(sharding, padded,
                                               (global_rows, *local_rows.shape[1:])),
        jax.make_array_from_process_local_data(sharding, weights, (global_rows,)),
    )


def gather_over_processes(values: np.ndarray) -> np.ndarray:
    """Every process's `values`, stacked as (process_count, ...); no collective in one process.

    Small host-side agreements (row counts, batch plans) go through here; every process must
    call it at the same point.
    """
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    return np.asarray(multihost_utils.process_allgather(values))


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a row-sharded global array, in order (replicas read once)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    blocks = {}
    for shard in array.addressable_shards:
        blocks.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])
