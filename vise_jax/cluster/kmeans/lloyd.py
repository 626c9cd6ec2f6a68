"""fit: Lloyd iterations over rows held on the devices, driven from the host, with scikit-learn's
convergence test and re-seeding of empty clusters."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import Mesh

from vise_jax import sharding
from vise_jax.cluster.kmeans import checks
from vise_jax.cluster.kmeans.matmul import splits_products
from vise_jax.cluster.kmeans.options import (
    COSINE,
    KMeansOptions,
    KMeansResult,
    make_result,
    progress_bar,
)
from vise_jax.cluster.kmeans.passes import (
    PassStats,
    Totals,
    chunk_rows,
    farthest_rows,
    no_ids,
    pass_fn,
    pass_rows,
)
from vise_jax.cluster.kmeans.seeding import start
from vise_jax.cluster.kmeans.shards import replicate
from vise_jax.cluster.kmeans.space import from_working_space


def fit(x: np.ndarray, options: KMeansOptions, mesh: Mesh | None = None,
        init_centroids: np.ndarray | None = None) -> KMeansResult:
    """Clusters `x` (this process's rows; on multi-host each process passes its own) with Lloyd.

    `init_centroids` (k, d) replaces the seeding given by `options.init`.
    """
    x = checks.checked_rows(x, options.metric, 'k-means')
    checks.check_enough_rows(options.k, checks.total_rows(x.shape[0]))
    checks.check_resolvable(x, options.metric, 'k-means')
    init_centroids = checks.checked_centroids(init_centroids, options, x.shape[1])
    mesh = mesh if mesh is not None else sharding.make_mesh()
    rows, weights, centroids, shift, spread = start(x, options, init_centroids, mesh, 'k-means')
    return _lloyd(rows, weights, centroids, shift, spread, options, mesh)


@dataclasses.dataclass
class _Iterate:
    """What one Lloyd iteration leaves for the next: the centroids and the last pass's labels."""

    centroids: np.ndarray    # (k, d) float32, working space
    ids: jax.Array
    totals: Totals | None = None


def _lloyd(rows, weights, centroids, shift, spread, options: KMeansOptions,
           mesh: Mesh) -> KMeansResult:
    run_pass = functools.partial(
        pass_fn(mesh, options.metric, chunk_rows(options.chunk_rows, options.k, mesh), True),
        pass_rows(rows, weights, mesh, splits_products(options.matmul_precision, mesh)))
    state = _Iterate(centroids, no_ids(mesh, rows.shape[0]))
    tol = options.tol * spread
    labels_stable = converged = False
    bar = progress_bar(options, options.max_iters, 'iter')
    iterations = 0
    for _ in range(options.max_iters):
        iterations += 1
        stats = run_pass(replicate(state.centroids, mesh), state.ids)
        totals = Totals.of(stats)
        sums, counts, relocated = _relocate_empty_clusters(totals, stats, rows, weights, mesh)
        new_centroids = _centroids_from_sums(sums, counts, state.centroids, options.metric)
        shift_sq = float(np.sum((new_centroids.astype(np.float64) - state.centroids) ** 2))
        state = _Iterate(new_centroids, stats.ids, totals)
        bar.update(1)
        bar.set_postfix(inertia=f'{totals.inertia:.6g}')
        if totals.changed == 0 and not relocated:
            labels_stable = converged = True  # the pass already used these very centroids
            break
        if shift_sq <= tol:
            converged = True
            break
    bar.close()
    if not labels_stable and options.final_assignment:  # so inertia and counts fit centroids
        state.totals = Totals.of(run_pass(replicate(state.centroids, mesh), state.ids))
    return make_result(options, from_working_space(state.centroids, shift, options.metric),
                       state.totals.inertia, iterations, converged, state.totals.counts)


def _centroids_from_sums(sums: np.ndarray, counts: np.ndarray, previous: np.ndarray,
                         metric: str) -> np.ndarray:
    """Cluster means (normalised for cosine); a cluster left without rows keeps its centroid."""
    sums = sums.astype(np.float64)
    updated = previous.astype(np.float64)
    if metric == COSINE:
        norms = np.linalg.norm(sums, axis=1)
        filled = (counts > 0) & (norms > 0)
        updated[filled] = sums[filled] / norms[filled, None]
    else:
        filled = counts > 0
        updated[filled] = sums[filled] / counts[filled, None]
    return updated.astype(np.float32)


def _relocate_empty_clusters(totals: Totals, stats: PassStats, rows, weights,
                             mesh: Mesh) -> tuple[np.ndarray, np.ndarray, bool]:
    """(sums, counts, whether any cluster was empty), every empty cluster re-seeded.

    As scikit-learn does: the empty clusters take the rows farthest from their centroids (one
    each, farthest first), and those rows leave the clusters they were in. With fewer distinct
    rows than clusters the rows taken sit on their own centroids, the re-seeded centroid copies
    theirs, and the cluster is empty again after the next pass: the result then reports it
    (KMeansResult.empty_clusters, and a warning).
    """
    empty = np.flatnonzero(totals.counts == 0)
    if not empty.size:
        return totals.sums, totals.counts, False
    far = farthest_rows(rows, weights, stats.ids, stats.distances, empty.size, mesh)
    sums, counts = totals.sums.copy(), totals.counts.copy()
    for cluster, row, owner in zip(empty, far.rows, far.ids, strict=True):
        sums[owner] -= row
        counts[owner] -= 1
        sums[cluster] = row
        counts[cluster] = 1
    return sums, counts, True
