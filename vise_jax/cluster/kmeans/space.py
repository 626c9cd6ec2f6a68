"""The working space: euclidean rows centred on a shift vector (their mean), cosine rows unit
length; the maps into it and back."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vise_jax import sharding
from vise_jax.cluster.kmeans.options import COSINE
from vise_jax.cluster.kmeans.shards import ROWS, WHOLE


def to_working_space(centroids: np.ndarray, shift: np.ndarray, metric: str) -> np.ndarray:
    if metric == COSINE:
        return unit_rows(centroids.astype(np.float64)).astype(np.float32)
    return (centroids.astype(np.float64) - shift).astype(np.float32)


def from_working_space(centroids: np.ndarray, shift: np.ndarray, metric: str) -> np.ndarray:
    if metric == COSINE:
        return unit_rows(centroids.astype(np.float64)).astype(np.float32)
    return (centroids.astype(np.float64) + shift).astype(np.float32)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@functools.cache
def prepare_fn(mesh: Mesh, metric: str):
    """(raw rows, weights) -> (working float32 rows, shift (d,), mean per-feature variance)."""

    def prepare(x, w):
        x = _unit_rows_jnp(x.astype(jnp.float32)) if metric == COSINE else x.astype(jnp.float32)
        total_weight = jax.lax.psum(jnp.sum(w), sharding.ROW_AXES)
        mean = jax.lax.psum(w @ x, sharding.ROW_AXES) / total_weight
        centred = x - mean
        spread = jax.lax.psum(jnp.sum(w * jnp.sum(centred * centred, axis=1)),
                              sharding.ROW_AXES) / (total_weight * x.shape[1])
        if metric == COSINE:
            return x, jnp.zeros_like(mean), spread
        return centred, mean, spread

    mapped = jax.shard_map(prepare, mesh=mesh, in_specs=(ROWS, ROWS),
                           out_specs=(ROWS, WHOLE, WHOLE))
    rows, whole = sharding.row_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(mapped, in_shardings=(rows, rows), out_shardings=(rows, whole, whole))


@functools.cache
def transform_fn(mesh: Mesh, metric: str):
    """Raw batch rows -> working float32 rows, given the shift (ignored for cosine)."""

    def transform(x, shift):
        x = x.astype(jnp.float32)
        return _unit_rows_jnp(x) if metric == COSINE else x - shift

    rows = sharding.row_sharding(mesh)
    return jax.jit(transform, in_shardings=(rows, sharding.replicated(mesh)), out_shardings=rows)


def _unit_rows_jnp(x: jax.Array) -> jax.Array:
    # float32 squares: checks.checked_rows has brought every cosine row's norm into a range
    # where they neither underflow nor overflow.
    norms = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    return jnp.where(norms > 0, x / jnp.where(norms > 0, norms, 1), 0)  # padding rows stay 0
