"""Rows split over the mesh's devices: the partition specs of the per-device code (shard_map),
replicated host arrays, and the top rows over every device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from vise_jax import sharding

ROWS = P(sharding.ROW_AXES)   # a shard_map argument split by rows over every device
WHOLE = P()                   # one held whole by every device


def replicate(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array every process holds identically, as one replicated device array."""
    array = np.ascontiguousarray(array)
    return jax.make_array_from_callback(array.shape, sharding.replicated(mesh),
                                        lambda index: array[index])


def global_top(score: jax.Array, payloads: tuple, count: int) -> tuple:
    """(scores, *payloads) of the `count` highest scores over all devices; ties: lowest row first.

    Runs inside shard_map. Each device keeps its own top `count`, the devices' tops are gathered
    in device (= row) order, and the top of those is taken; lax.top_k puts the lower index first
    among equal scores.
    """
    local_count = min(count, score.shape[0])
    top_scores, top_index = jax.lax.top_k(score, local_count)
    gathered = [_gather_from_devices(part)
                for part in (top_scores, *(payload[top_index] for payload in payloads))]
    best_scores, best_index = jax.lax.top_k(gathered[0], count)
    return (best_scores, *(part[best_index] for part in gathered[1:]))


def _gather_from_devices(part: jax.Array) -> jax.Array:
    """Every device's `part` concatenated in device order, known to be equal on all devices.

    A psum of per-device slots rather than lax.all_gather, whose result shard_map types as
    varying across devices and so cannot be returned as replicated.
    """
    slots = jnp.zeros((_device_count(), *part.shape), part.dtype)
    slots = slots.at[jax.lax.axis_index(sharding.ROW_AXES)].set(part)
    gathered = jax.lax.psum(slots, sharding.ROW_AXES)
    return gathered.reshape(-1, *part.shape[1:])


def _device_count() -> int:
    return jax.lax.psum(1, sharding.ROW_AXES)
