"""What to fit (KMeansOptions), what a fit gives back (KMeansResult), and the names they use."""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
from tqdm import tqdm

from vise_jax.errors import InputError

log = logging.getLogger(__name__)

EUCLIDEAN = 'euclidean'
COSINE = 'cosine'
METRICS = (EUCLIDEAN, COSINE)
KMEANS_PLUS_PLUS = 'k-means++'
KMEANS_PARALLEL = 'k-means||'
RANDOM = 'random'
INITS = (KMEANS_PLUS_PLUS, KMEANS_PARALLEL, RANDOM)
FLOAT32 = 'float32'
BFLOAT16_3X = 'bfloat16_3x'
MATMUL_PRECISIONS = (FLOAT32, BFLOAT16_3X, 'auto')


def check_matmul_precision(value: str, what: str) -> None:
    if value not in MATMUL_PRECISIONS:
        raise InputError(f'{what}: matmul_precision must be one of {MATMUL_PRECISIONS}, '
                         f'got {value!r}')


@dataclasses.dataclass(frozen=True)
class KMeansOptions:
    """How to cluster.

    k: number of clusters.
    metric: 'euclidean' (squared L2 distance) or 'cosine' (spherical k-means: rows and centroids
        L2-normalised, rows go to the centroid of largest dot product, distance is 1 - cos).
    max_iters: Lloyd iterations at most (fit; fit_minibatch counts passes with `epochs`).
    tol: convergence threshold, relative to the data's mean per-feature variance (see the package
        docstring); 0 stops only when no label changes.
    init: 'k-means++' (greedy, 2 + ln k candidates per centre, as scikit-learn does; k sequential
        passes over the rows, so best for fits of moderate N x k), 'k-means||' (Bahmani et al.
        2012: `init_rounds` passes that each sample about `oversampling * k` candidates, then
        k-means++ on the candidates weighted by the rows they attract; for large N x k: on
        100k x 384 rows, k=1000, 2 CPU cores, it seeds in 3.5 s where k-means++ takes 11 s) or
        'random' (k distinct rows).
    seed: the only source of randomness; the same seed gives the same result.
    chunk_rows: rows per device handled at once; the k x chunk_rows block of products is the
        largest temporary. None sizes it to k: about 1 MiB on CPU (256 rows for k=1000; the
        block stays in cache, and 256 ran fastest there), about 64 MiB on accelerators.
    oversampling, init_rounds: k-means|| sampling (candidates per round as a multiple of k; rounds).
    final_assignment: after the last update, assign the rows once more so that `inertia` and
        `counts` describe the returned centroids (scikit-learn does the same). False skips that
        pass (as faiss does): they then describe the last iteration's assignment, made with the
        centroids before its update. Worth it when assign() runs over the same rows afterwards.
    matmul_precision: how the rows x centroids products are computed. 'float32'; 'bfloat16_3x'
        (each side split into a bfloat16 high part and a bfloat16 remainder, three bfloat16
        products summed in float32: x.c to ~1e-5 of |x||c|, against ~1e-7 in float32; on CPUs
        with AMX it runs at several times the float32 rate); 'auto' (bfloat16_3x where the
        hardware multiplies bfloat16, see vise_jax.precision; float32 elsewhere).
    progress: show a tqdm bar over iterations (only on a terminal, and only on process 0).
    """

    k: int
    metric: str = EUCLIDEAN
    max_iters: int = 100
    tol: float = 1e-4
    init: str = KMEANS_PLUS_PLUS
    seed: int = 0
    chunk_rows: int | None = None
    oversampling: float = 2.0
    init_rounds: int = 5
    final_assignment: bool = True
    matmul_precision: str = FLOAT32
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise InputError(f'k-means: k must be an integer >= 1, got {self.k!r}')
        if self.metric not in METRICS:
            raise InputError(f'k-means: metric must be one of {METRICS}, got {self.metric!r}')
        if self.init not in INITS:
            raise InputError(f'k-means: init must be one of {INITS}, got {self.init!r}')
        if self.max_iters < 1:
            raise InputError(f'k-means: max_iters must be >= 1, got {self.max_iters}')
        if not self.tol >= 0:
            raise InputError(f'k-means: tol must be >= 0, got {self.tol}')
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise InputError(f'k-means: chunk_rows must be >= 1, got {self.chunk_rows}')
        check_matmul_precision(self.matmul_precision, 'k-means')
        if not self.oversampling > 0 or self.init_rounds < 1:
            raise InputError('k-means: k-means|| needs oversampling > 0 and init_rounds >= 1, '
                             f'got {self.oversampling} and {self.init_rounds}')


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    """A fitted clustering.

    centroids: (k, d) float32, in the input's space (unit length for 'cosine').
    inertia: sum over rows of the distance to their centroid (squared L2, or 1 - cos), for the
        returned centroids (unless options.final_assignment is False).
    iterations: Lloyd iterations run (fit) or mini-batches processed (fit_minibatch).
    converged: whether the tolerance was met before max_iters. It says nothing about empty
        clusters: read `empty_clusters` as well.
    counts: (k,) int64 rows per cluster, likewise.
    empty_clusters: clusters that `counts` leaves without a row. 0 after any fit of rows with at
        least k distinct values; more when there are fewer (re-seeding an empty cluster then can
        only copy a centroid that another cluster keeps); a warning is logged whenever it is not 0.
    """

    centroids: np.ndarray
    inertia: float
    iterations: int
    converged: bool
    counts: np.ndarray
    empty_clusters: int = 0


def make_result(options: KMeansOptions, centroids: np.ndarray, inertia: float,
                iterations: int, converged: bool, counts: np.ndarray) -> KMeansResult:
    """The KMeansResult of a fit, with its empty clusters counted and, if any, a warning."""
    empty = int(np.count_nonzero(counts == 0))
    if empty:
        log.warning('k-means k=%d: %d cluster(s) ended with no rows (converged=%s): the rows '
                    'most likely hold fewer than k distinct values, so that re-seeding an empty '
                    'cluster could only copy a centroid that another cluster keeps. A smaller k, '
                    'or de-duplicated rows, avoids it.', options.k, empty, converged)
    return KMeansResult(centroids, inertia, iterations, converged, counts, empty)


def progress_bar(options: KMeansOptions, total: int | None, unit: str) -> tqdm:
    show = options.progress and jax.process_index() == 0
    return tqdm(total=total, desc=f'k-means k={options.k}', unit=unit, leave=False,
                disable=None if show else True)
