"""fit_minibatch: mini-batch k-means (Sculley 2010) for rows that need not fit in memory."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from jax.sharding import Mesh

from vise_jax import sharding
from vise_jax.cluster.kmeans import checks
from vise_jax.cluster.kmeans.assign import put_batch, split_if_array, stream_passes
from vise_jax.cluster.kmeans.matmul import splits_products
from vise_jax.cluster.kmeans.options import (
    COSINE,
    KMeansOptions,
    KMeansResult,
    make_result,
    progress_bar,
)
from vise_jax.cluster.kmeans.passes import (
    Totals,
    chunk_rows,
    farthest_rows,
    no_ids,
    pass_fn,
    pass_rows,
)
from vise_jax.cluster.kmeans.seeding import start
from vise_jax.cluster.kmeans.shards import replicate
from vise_jax.cluster.kmeans.space import (
    from_working_space,
    transform_fn,
    unit_rows,
)
from vise_jax.errors import InputError


def fit_minibatch(batches: Callable[[], Iterable[np.ndarray]] | Sequence[np.ndarray] | np.ndarray,
                  options: KMeansOptions, mesh: Mesh | None = None, epochs: int = 1,
                  init_centroids: np.ndarray | None = None,
                  batch_rows: int = 1 << 16) -> KMeansResult:
    """Mini-batch k-means (Sculley 2010) for data that need not fit in memory.

    Each centroid keeps the number of rows it has absorbed; a batch moves it to the running mean
    of all those rows, so its step size shrinks as 1 / count. `batches` is a callable returning a
    fresh iterable of (rows, d) arrays, a list of arrays, or one array (split into `batch_rows`),
    read `epochs` times and once more to assign every row to the final centroids (for the
    inertia and counts). Unless `init_centroids` is given, seeding (options.init) runs on the
    first batches: at least three batches' worth and 3 k rows, as scikit-learn's
    MiniBatchKMeans does. Stops early when a whole epoch moves the centroids by no more than the
    tolerance (relative to the variance of those first rows).
    """
    if epochs < 1:
        raise InputError(f'k-means mini-batch: epochs must be >= 1, got {epochs}')
    read_batches = _batch_source(batches, batch_rows, epochs)
    mesh = mesh if mesh is not None else sharding.make_mesh()
    sample = _seed_sample(read_batches, options, init_centroids is not None)
    state = _start_minibatch(sample, options, mesh, init_centroids)
    del sample
    bar = progress_bar(options, _batch_count_hint(batches, batch_rows, epochs), 'batch')
    converged = False
    for _ in range(epochs):
        epoch_start = state.centroids.copy()
        for batch in _checked_batches(read_batches(), options.metric, state.shift.shape[0]):
            inertia = _minibatch_step(state, batch, options, mesh)
            bar.update(1)
            bar.set_postfix(batch_inertia=f'{inertia:.4g}')
        if float(np.sum((state.centroids - epoch_start) ** 2)) <= options.tol * state.spread:
            converged = True
            break
    bar.close()
    centroids = from_working_space(state.centroids, state.shift, options.metric)
    inertia, counts = 0.0, np.zeros(options.k, np.int64)
    for stats, _ in stream_passes(read_batches(), centroids, options.metric, mesh,
                                  options.chunk_rows, batch_rows, options.matmul_precision):
        totals = Totals.of(stats)  # over every process's rows
        inertia += totals.inertia
        counts += totals.counts
    return make_result(options, centroids, inertia, state.batches, converged, counts)


def _batch_source(batches, batch_rows: int, epochs: int) -> Callable[[], Iterable[np.ndarray]]:
    """A callable that returns a fresh pass over the batches."""
    if callable(batches):
        return batches
    if isinstance(batches, np.ndarray):
        return lambda: split_if_array(batches, batch_rows)
    if isinstance(batches, Iterator):
        raise InputError(
            f'k-means mini-batch: batches is a one-shot iterator, but the data are read '
            f'{epochs + 1} times ({epochs} epoch(s), then the final assignment); pass a callable '
            'that returns a fresh iterable, or a list')
    return lambda: batches


def _batch_count_hint(batches, batch_rows: int, epochs: int) -> int | None:
    if isinstance(batches, np.ndarray):
        return epochs * -(-batches.shape[0] // batch_rows)
    return epochs * len(batches) if isinstance(batches, Sequence) else None


@dataclasses.dataclass
class _MiniBatchState:
    centroids: np.ndarray    # (k, d) float32, working space (unit rows for cosine)
    means: np.ndarray        # (k, d) float64 running mean of each cluster's rows
    counts: np.ndarray       # (k,) float64 rows absorbed so far
    shift: np.ndarray        # (d,) working-space shift (zero for cosine)
    spread: float            # mean per-feature variance of the first batch
    batches: int = 0


def _seed_sample(read_batches, options: KMeansOptions, have_init: bool) -> np.ndarray:
    """The first rows of the data, enough to seed from: as scikit-learn's MiniBatchKMeans does,
    at least three batches' worth and 3 k rows (or all the data, if less). With init_centroids
    only the first batch is read: it fixes the working space and the tolerance's scale."""
    taken, count, wanted = [], 0, None
    for batch in _checked_batches(read_batches(), options.metric, None):
        if not batch.shape[0]:
            continue
        taken.append(batch)
        count += batch.shape[0]
        wanted = wanted or (1 if have_init else max(3 * batch.shape[0], 3 * options.k))
        if count >= wanted:
            break
    if not taken:
        raise InputError('k-means mini-batch: no rows to cluster (the batches are empty)')
    if not have_init:
        checks.check_enough_rows(options.k, checks.total_rows(count))
    return np.concatenate(taken)


def _checked_batches(batches: Iterable, metric: str, width: int | None) -> Iterator[np.ndarray]:
    """The batches, each checked like fit's input, with row numbers counted across batches."""
    row_offset = 0
    for batch in batches:
        batch = checks.checked_rows(batch, metric, 'k-means mini-batch', row_offset,
                                    allow_empty=True)
        row_offset += batch.shape[0]
        width = checks.check_width(batch, width, 'k-means mini-batch')
        yield batch


def _start_minibatch(sample: np.ndarray, options: KMeansOptions, mesh: Mesh,
                     init_centroids) -> _MiniBatchState:
    """Seeds from the sample (or takes init_centroids) and fixes the working space from it."""
    checks.check_resolvable(sample, options.metric, 'k-means mini-batch')
    init_centroids = checks.checked_centroids(init_centroids, options, sample.shape[1])
    _, _, centroids, shift, spread = start(sample, options, init_centroids, mesh,
                                           'k-means mini-batch')
    return _MiniBatchState(centroids, centroids.astype(np.float64), np.zeros(options.k),
                           shift, spread)


def _minibatch_step(state: _MiniBatchState, batch: np.ndarray, options: KMeansOptions,
                    mesh: Mesh) -> float:
    """Moves the centroids to the running means including this batch; returns its inertia."""
    chunk = chunk_rows(options.chunk_rows, options.k, mesh)
    rows, weights = put_batch(batch, mesh, chunk)
    rows = transform_fn(mesh, options.metric)(rows, replicate(state.shift.astype(np.float32),
                                                               mesh))
    split = splits_products(options.matmul_precision, mesh)
    stats = pass_fn(mesh, options.metric, chunk, True)(
        pass_rows(rows, weights, mesh, split), replicate(state.centroids, mesh),
        no_ids(mesh, rows.shape[0]))
    totals = Totals.of(stats)
    hit = totals.counts > 0
    counts = state.counts + totals.counts
    state.means[hit] = ((state.means[hit] * state.counts[hit, None] + totals.sums[hit])
                        / counts[hit, None])
    state.counts = counts
    empty = np.flatnonzero(state.counts == 0)
    if empty.size and totals.counts.sum() >= empty.size:
        # A centroid no row has reached yet restarts at one of the batch's outlying rows.
        far = farthest_rows(rows, weights, stats.ids, stats.distances, empty.size, mesh)
        state.means[empty] = far.rows
        state.counts[empty] = 1
    state.centroids = (unit_rows(state.means) if options.metric == COSINE
                       else state.means).astype(np.float32)
    state.batches += 1
    return totals.inertia
