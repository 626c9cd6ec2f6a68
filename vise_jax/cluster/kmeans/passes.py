"""One pass over the rows: nearest centroids, per-cluster sums, counts and inertia; and the rows
farthest from their centroids, which re-seed empty clusters."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vise_jax import sharding
from vise_jax.cluster.kmeans.matmul import HIGHEST, matmul_lhs, split_rows_fn
from vise_jax.cluster.kmeans.options import COSINE
from vise_jax.cluster.kmeans.shards import ROWS, WHOLE, global_top


class PassStats(NamedTuple):
    sums: jax.Array          # (k, d) sums of each cluster's real rows
    counts: jax.Array        # (k,) int32 real rows per cluster
    inertia: jax.Array       # () sum of the real rows' distances
    changed: jax.Array       # () real rows whose id differs from `previous_ids`
    ids: jax.Array           # (rows,) nearest centroid, sharded like the rows
    distances: jax.Array     # (rows,) distance to it


class PassRows(NamedTuple):
    """What a pass reads of the rows, derived once before the passes rather than per chunk
    and pass (where the bfloat16 split and the norms cost a fifth of a pass)."""

    x: jax.Array             # (n, d) float32 working rows: the centroid sums
    products: jax.Array      # the rows as the products take them: x, or for bfloat16_3x the
                             # (n, 3d) bits of [high, low, high] (see matmul.split_rows_fn)
    sqnorms: jax.Array       # (n,) |x|^2: the distances
    weights: jax.Array       # (n,) 1 for real rows, 0 for padding


def pass_rows(rows: jax.Array, weights: jax.Array, mesh: Mesh, split: bool) -> PassRows:
    sqnorms = _sqnorms_fn(mesh)(rows)
    return PassRows(rows, split_rows_fn(mesh)(rows) if split else rows, sqnorms, weights)


@functools.cache
def _sqnorms_fn(mesh: Mesh):
    rows = sharding.row_sharding(mesh)
    return jax.jit(lambda x: jnp.sum(x * x, axis=1), in_shardings=rows, out_shardings=rows)


def _nearest(sqnorms: jax.Array, product_chunk: jax.Array, lhs: jax.Array,
             half_sqnorms: jax.Array, metric: str):
    """Nearest centroid of each row of a chunk: (ids int32, distances float32).

    `product_chunk` is the chunk as PassRows.products holds it, `lhs` the centroids as
    matmul_lhs gives them, `sqnorms` the rows' squared norms. The products are laid out
    (centroids, rows) so that the reductions over centroids run down columns, vectorised across
    rows; on CPU this made the reductions after the matmul cost half as much as with (rows,
    centroids).
    """
    dots = jax.lax.dot_general(lhs, product_chunk, (((1,), (1,)), ((), ())), precision=HIGHEST,
                               preferred_element_type=jnp.float32)
    if metric == COSINE:
        best = jnp.max(dots, axis=0)
        return _first_index_of(dots, best), jnp.maximum(1.0 - best, 0.0)
    # argmin ||x - c||^2 = argmin (||c||^2 / 2 - x.c): ||x||^2 is the same for every centroid.
    scores = half_sqnorms[:, None] - dots
    best = jnp.min(scores, axis=0)
    # The distance from the same matmul, rather than ||x - c||^2 recomputed for the chosen
    # centroid: that gather cost a sixth of the pass, and centred rows keep the error ~1e-6.
    distances = jnp.maximum(sqnorms + 2.0 * best, 0.0)
    return _first_index_of(scores, best), distances


def _first_index_of(scores: jax.Array, best: jax.Array) -> jax.Array:
    """Per column, the first row where `scores` equals `best`: np.argmin's tie-breaking.

    Two plain reductions (the min, then this) rather than one argmin: XLA's CPU backend runs a
    variadic (value, index) reduction at a fraction of the speed of a min, and that alone
    halved the throughput of the whole pass.
    """
    rows = jnp.arange(scores.shape[0], dtype=jnp.int32)[:, None]
    return jnp.min(jnp.where(scores == best[None, :], rows, scores.shape[0]), axis=0)


def _local_pass(rows: PassRows, centroids, previous_ids, *, metric: str, chunk_rows: int,
                with_sums: bool) -> PassStats:
    """One device's rows, chunk by chunk; padding rows have weight 0."""
    n, d = rows.x.shape
    k = centroids.shape[0]
    chunk = max(1, min(chunk_rows, n))
    half_sqnorms = 0.5 * jnp.sum(centroids * centroids, axis=1)
    split = rows.products.dtype == jnp.uint16   # bfloat16_3x, as bits (see split_rows_fn)
    lhs = matmul_lhs(centroids, split)

    def visit(start, size, acc):
        sums, counts, inertia, all_ids, all_distances = acc
        part = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size), rows)
        products = part.products
        if split:
            products = jax.lax.bitcast_convert_type(products, jnp.bfloat16)
        real = part.weights > 0
        ids, distances = _nearest(part.sqnorms, products, lhs, half_sqnorms, metric)
        # Padding rows get cluster k, out of range, which segment_sum drops.
        members = jnp.where(real, ids, k)
        if with_sums:
            sums = sums + jax.ops.segment_sum(part.x, members, k)
        counts = counts + jax.ops.segment_sum(jnp.ones(size, jnp.int32), members, k)
        inertia = inertia + jnp.sum(jnp.where(real, distances, 0.0))
        all_ids = jax.lax.dynamic_update_slice_in_dim(all_ids, ids, start, 0)
        all_distances = jax.lax.dynamic_update_slice_in_dim(all_distances, distances, start, 0)
        return sums, counts, inertia, all_ids, all_distances

    acc = (jnp.zeros((k, d) if with_sums else (k, 0), jnp.float32), jnp.zeros(k, jnp.int32),
           jnp.zeros((), jnp.float32), jnp.zeros(n, jnp.int32), jnp.zeros(n, jnp.float32))
    # Each device accumulates its own partial results until the psum below.
    acc = jax.lax.pcast(acc, sharding.ROW_AXES, to='varying')
    full_chunks = n // chunk
    acc = jax.lax.fori_loop(0, full_chunks, lambda i, acc: visit(i * chunk, chunk, acc), acc)
    if n % chunk:
        acc = visit(full_chunks * chunk, n % chunk, acc)
    sums, counts, inertia, ids, distances = acc
    changed = jnp.sum(jnp.where((ids != previous_ids) & (rows.weights > 0), 1, 0))
    total = functools.partial(jax.lax.psum, axis_name=sharding.ROW_AXES)
    return PassStats(total(sums), total(counts), total(inertia), total(changed), ids, distances)


def chunk_rows(requested: int | None, k: int, mesh: Mesh) -> int:
    """Rows per chunk: as requested, or a power of two that keeps the k x rows block of products
    near 1 MiB on CPU (in cache) and near 64 MiB on accelerators."""
    if requested is not None:
        return requested
    budget = 1 << 18 if mesh.devices.flat[0].platform == 'cpu' else 1 << 24  # float32s
    rows = max(1, budget // max(k, 1))
    return int(min(max(64, 1 << (rows.bit_length() - 1)), 1 << 16))


@functools.cache
def pass_fn(mesh: Mesh, metric: str, chunk_rows: int, with_sums: bool):
    """jit(shard_map) of `_local_pass`: (PassRows, centroids, previous ids) -> PassStats."""
    local = functools.partial(_local_pass, metric=metric, chunk_rows=chunk_rows,
                              with_sums=with_sums)
    specs = PassStats(WHOLE, WHOLE, WHOLE, WHOLE, ROWS, ROWS)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(ROWS, WHOLE, ROWS), out_specs=specs)
    rows, whole = sharding.row_sharding(mesh), sharding.replicated(mesh)
    shardings = PassStats(*(rows if spec == ROWS else whole for spec in specs))
    return jax.jit(mapped, in_shardings=(rows, whole, rows), out_shardings=shardings)


def no_ids(mesh: Mesh, num_rows: int) -> jax.Array:
    """A 'previous ids' array that differs from every real assignment."""
    return _no_ids_fn(mesh, num_rows)()


@functools.cache
def _no_ids_fn(mesh: Mesh, num_rows: int):
    return jax.jit(lambda: jnp.full((num_rows,), -1, jnp.int32),
                   out_shardings=sharding.row_sharding(mesh))


class Totals(NamedTuple):
    """A pass's reductions, on the host."""

    sums: np.ndarray         # (k, d) float64
    counts: np.ndarray       # (k,) int64
    inertia: float
    changed: int

    @classmethod
    def of(cls, stats: PassStats) -> Totals:
        # One transfer for all four: each separate fetch would wait on the device on its own.
        sums, counts, inertia, changed = jax.device_get(
            (stats.sums, stats.counts, stats.inertia, stats.changed))
        return cls(np.asarray(sums, np.float64), np.asarray(counts, np.int64), float(inertia),
                   int(changed))


class FarRows(NamedTuple):
    distances: np.ndarray    # (count,) farthest first
    rows: np.ndarray         # (count, d) float64, working space
    ids: np.ndarray          # (count,) the clusters they are in


def farthest_rows(rows, weights, ids, distances, count: int, mesh: Mesh) -> FarRows:
    """The `count` real rows farthest from their centroids after a pass, over all devices."""
    # Compiled for a power-of-two count so that a varying number of empty clusters reuses code.
    found = _farthest_fn(mesh, 1 << (count - 1).bit_length())(rows, weights, ids, distances)
    distances, rows, ids = (np.asarray(part)[:count] for part in found)
    return FarRows(distances, rows.astype(np.float64), ids.astype(np.int64))


@functools.cache
def _farthest_fn(mesh: Mesh, count: int):
    """The `count` real rows farthest from their centroids, over all devices, farthest first."""

    def farthest(x, w, ids, distances):
        score = jnp.where(w > 0, distances, -jnp.inf)
        return global_top(score, (x, ids), count)

    mapped = jax.shard_map(farthest, mesh=mesh, in_specs=(ROWS,) * 4, out_specs=WHOLE)
    rows, whole = sharding.row_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(mapped, in_shardings=(rows,) * 4, out_shardings=whole)
