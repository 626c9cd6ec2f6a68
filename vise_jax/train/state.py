"""The train state as a plain pytree, and where each of its arrays lives on the mesh.

Parameters and optimizer state are replicated over the 'data' axis. With an 'fsdp' axis larger
than one, every array of at least `FSDP_MIN_SIZE` elements is also split over 'fsdp' along its
largest dimension that divides evenly (ZeRO-3 style, as big_vision's fsdp rule does), so a
K = 5000 head or a wide trunk need not fit whole on each chip. The rule looks only at shapes, so a
parameter and its momentum always get the same layout. XLA inserts the all-gathers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vise_jax import sharding

FSDP_MIN_SIZE = 2 ** 16


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> PartitionSpec:
    """Split the largest evenly divisible dimension over 'fsdp'; small arrays stay whole."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = sharding.FSDP_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
    fsdp = mesh.shape[sharding.FSDP_AXIS]
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp, min_size)), abstract_state)


def init_fn(model: flax.linen.Module, optimizer: optax.GradientTransformation,
            image_size: int) -> Callable[[jax.Array], TrainState]:
    """rng -> a fresh TrainState (batch of one image of the training size)."""

    def init(rng: jax.Array) -> TrainState:
        images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
        variables = model.init(rng, images, train=False)
        params = variables['params']
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get('batch_stats', {}),
                          opt_state=optimizer.init(params))

    return init


def create_train_state(model: flax.linen.Module, optimizer: optax.GradientTransformation,
                       image_size: int, rng: jax.Array, mesh: Mesh,
                       min_size: int = FSDP_MIN_SIZE) -> tuple[TrainState, Any]:
    """Initialises the state directly in its sharded layout; returns (state, its shardings)."""
    init = init_fn(model, optimizer, image_size)
    shardings = state_shardings(jax.eval_shape(init, rng), mesh, min_size)
    return jax.jit(init, out_shardings=shardings)(rng), shardings


def param_count(params: Any) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
