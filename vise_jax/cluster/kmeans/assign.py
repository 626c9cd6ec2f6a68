"""assign: the nearest centroid of every row, with the rows streamed through the devices in
batches; the same stream gives fit_minibatch its final inertia and counts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from vise_jax import sharding
from vise_jax.cluster.kmeans import checks, passes
from vise_jax.cluster.kmeans.matmul import splits_products
from vise_jax.cluster.kmeans.options import EUCLIDEAN, FLOAT32, METRICS, check_matmul_precision
from vise_jax.cluster.kmeans.shards import replicate
from vise_jax.cluster.kmeans.space import to_working_space, transform_fn
from vise_jax.errors import InputError


def assign(batches: np.ndarray | Iterable[np.ndarray], centroids: np.ndarray,
           metric: str = EUCLIDEAN, mesh: Mesh | None = None,
           chunk_rows: int | None = None, batch_rows: int = 1 << 18,
           matmul_precision: str = FLOAT32) -> tuple[np.ndarray, np.ndarray]:
    """The nearest centroid of every row: (ids int32, distances float32), in input order.

    Distances are squared L2 ('euclidean') or 1 - cos ('cosine'). `batches` is one array (split
    into batches of `batch_rows`) or an iterable of (rows, d) arrays, streamed through the
    devices one at a time; on multi-host every process must yield the same number of batches.
    `matmul_precision` is as in KMeansOptions.
    """
    ids, distances = [], []
    for stats, count in stream_passes(batches, centroids, metric, mesh, chunk_rows, batch_rows,
                                      matmul_precision):
        ids.append(sharding.local_rows(stats.ids)[:count])
        distances.append(sharding.local_rows(stats.distances)[:count])
    if not ids:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    return np.concatenate(ids), np.concatenate(distances)


def stream_passes(batches, centroids, metric: str, mesh: Mesh | None, chunk_rows: int | None,
                  batch_rows: int, matmul_precision: str) -> Iterator[tuple[passes.PassStats, int]]:
    """Streams each batch through the devices: yields (its pass, its number of local rows)."""
    if metric not in METRICS:
        raise InputError(f'k-means assign: metric must be one of {METRICS}, got {metric!r}')
    check_matmul_precision(matmul_precision, 'k-means assign')
    centroids = checks.checked_rows(centroids, metric, 'k-means assign: centroids')
    mesh = mesh if mesh is not None else sharding.make_mesh()
    # Centring both sides on the centroids' mean keeps the matmul form of the distance accurate.
    shift = centroids.astype(np.float64).mean(axis=0) if metric == EUCLIDEAN else None
    working = replicate(to_working_space(centroids, shift, metric), mesh)
    shift = replicate(np.zeros(centroids.shape[1], np.float32) if shift is None
                      else shift.astype(np.float32), mesh)
    chunk = passes.chunk_rows(chunk_rows, centroids.shape[0], mesh)
    run_pass = passes.pass_fn(mesh, metric, chunk, False)
    split = splits_products(matmul_precision, mesh)
    row_offset = 0
    for batch in split_if_array(batches, batch_rows):
        batch = checks.checked_rows(batch, metric, 'k-means assign', row_offset, allow_empty=True)
        row_offset += batch.shape[0]
        checks.check_width(batch, centroids.shape[1], 'k-means assign')
        rows, weights = put_batch(batch, mesh, chunk)
        rows = transform_fn(mesh, metric)(rows, shift)
        stats = run_pass(passes.pass_rows(rows, weights, mesh, split), working,
                         passes.no_ids(mesh, rows.shape[0]))
        yield stats, batch.shape[0]


def split_if_array(batches, batch_rows: int) -> Iterable:
    if isinstance(batches, np.ndarray):
        return [batches[start:start + batch_rows]
                for start in range(0, max(batches.shape[0], 1), batch_rows)]
    return batches


def put_batch(batch: np.ndarray, mesh: Mesh, chunk_rows: int) -> tuple[jax.Array, jax.Array]:
    """put_rows, after padding the batch to a bucketed size so that a stream of batches of
    varying sizes compiles only a few shapes."""
    local_devices = len(mesh.local_devices)
    per_device = -(-batch.shape[0] // local_devices)
    if per_device <= chunk_rows:
        bucket = max(8, 1 << (per_device - 1).bit_length())
    else:
        bucket = -(-per_device // chunk_rows) * chunk_rows
    padded = np.zeros((bucket * local_devices, batch.shape[1]), batch.dtype)
    padded[:batch.shape[0]] = batch
    real = np.zeros(padded.shape[0], np.float32)
    real[:batch.shape[0]] = 1.0
    rows, _ = sharding.put_rows(padded, mesh)
    weights, _ = sharding.put_rows(real, mesh)
    return rows, weights
