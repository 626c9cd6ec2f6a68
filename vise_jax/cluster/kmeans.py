"""k-means in JAX, sharded over a device mesh: seeding, Lloyd, mini-batch, streaming assignment.

    result = kmeans.fit(sample, kmeans.KMeansOptions(k=1000, metric='cosine'))
    ids, distances = kmeans.assign(batches, result.centroids, metric='cosine')

How the work is split, and why:

* Rows are placed with `vise_jax.sharding.put_rows`: split over every device of the mesh (and on
  multi-host, every process passes its own rows), padded to a common size with rows of weight 0.
  Every reduction leaves those rows out, so padding never moves a centroid, a count or the
  inertia, and is never drawn as a seed.
* Per-device work runs under `jax.shard_map` inside `jax.jit`: each device walks its own rows in
  chunks of `chunk_rows` (a `fori_loop`), so the rows x centroids distance block exists one chunk
  at a time, and reduces per-cluster sums, counts and inertia with an explicit `psum` across
  devices and processes. shard_map rather than plain jit over sharded arrays because the chunk
  loop has to run over each device's local rows; a loop over chunks of the global array would
  make XLA move rows between devices.
* The host drives the Lloyd loop: one jitted pass per iteration returns the (k, d) sums, and the
  centroid update, convergence test, progress bar and the rare empty-cluster relocation are plain
  numpy on those sums. The (k, d) transfer is tiny next to the pass itself.
* Euclidean rows are centred on their mean first (as scikit-learn does), so the matmul form
  ||x||^2 - 2 x.c + ||c||^2, used for the assignment and for the distances reported, loses
  little to cancellation (~1e-6 relative). Cosine rows are L2-normalised instead.
* Convergence follows scikit-learn's KMeans: stop when no label changed since the last iteration,
  or when the squared centroid shift summed over clusters is <= tol * (mean per-feature variance
  of the data). An empty cluster is re-seeded, as in scikit-learn, with the point farthest from its
  centroid, taken out of that point's cluster.
* Random draws depend on the seed and a row's global index only, so a fit gives the same result
  on any number of devices (up to float rounding in the cross-device sums).

Inputs may be float16 (stored embeddings); all arithmetic is float32, except that with
matmul_precision='bfloat16_3x' the rows x centroids products are three bfloat16 products summed
in float32 (each side split as high + low; ~1e-5 of |x||c| against float32's ~1e-7). On a CPU
with AMX a pass is then ~1.2x faster, and the fits in bench/kmeans_bench.py end with the same
assignments as scikit-learn's in either precision.

On CPU, give XLA one device per core (XLA_FLAGS=--xla_force_host_platform_device_count=<cores>,
set before JAX starts) and pass the default mesh: XLA runs a device's matmuls on every core but
the reductions and the scatter after them on one thread, so a shard per core made a Lloyd pass
1.4x faster (bench/README.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from vise_jax import precision, sharding
from vise_jax.errors import InputError

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

_ROWS = P(sharding.ROW_AXES)
_WHOLE = P()
_HIGHEST = jax.lax.Precision.HIGHEST
_CHECK_BLOCK_ROWS = 1 << 16   # host-side input checks walk rows in blocks to bound memory
_CANDIDATE_BUCKET = 256       # k-means|| candidate sets are padded to a multiple of this
# Purposes of the random streams derived from the seed; distinct so that no two draws correlate.
_SEED_PLUS_PLUS, _SEED_RANDOM, _SEED_PARALLEL, _SEED_RECLUSTER = range(4)


@dataclasses.dataclass(frozen=True)
class KMeansOptions:
    """How to cluster.

    k: number of clusters.
    metric: 'euclidean' (squared L2 distance) or 'cosine' (spherical k-means: rows and centroids
        L2-normalised, rows go to the centroid of largest dot product, distance is 1 - cos).
    max_iters: Lloyd iterations at most (fit; fit_minibatch counts passes with `epochs`).
    tol: convergence threshold, relative to the data's mean per-feature variance (see the module
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
        _check_matmul_precision(self.matmul_precision, 'k-means')
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
    converged: whether the tolerance was met before max_iters.
    counts: (k,) int64 rows per cluster, likewise.
    """

    centroids: np.ndarray
    inertia: float
    iterations: int
    converged: bool
    counts: np.ndarray


# ---------------------------------------------------------------------------------------------
# Public API


def fit(x: np.ndarray, options: KMeansOptions, mesh: Mesh | None = None,
        init_centroids: np.ndarray | None = None) -> KMeansResult:
    """Clusters `x` (this process's rows; on multi-host each process passes its own) with Lloyd.

    `init_centroids` (k, d) replaces the seeding given by `options.init`.
    """
    x = _checked_rows(x, options.metric, 'k-means')
    _check_enough_rows(options.k, _total_rows(x.shape[0]))
    init_centroids = _checked_centroids(init_centroids, options, x.shape[1])
    mesh = mesh if mesh is not None else sharding.make_mesh()
    raw, weights = sharding.put_rows(x, mesh)
    rows, shift, spread = _prepare_fn(mesh, options.metric)(raw, weights)
    del raw
    shift = np.asarray(shift, np.float64)
    if init_centroids is None:
        centroids = _seed_centroids(rows, weights, options, mesh)
    else:
        centroids = _to_working_space(init_centroids, shift, options.metric)
    return _lloyd(rows, weights, centroids, shift, float(spread), options, mesh)


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
    for stats, count in _stream_passes(batches, centroids, metric, mesh, chunk_rows, batch_rows,
                                       matmul_precision):
        ids.append(sharding.local_rows(stats.ids)[:count])
        distances.append(sharding.local_rows(stats.distances)[:count])
    if not ids:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    return np.concatenate(ids), np.concatenate(distances)


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
    bar = _progress_bar(options, _batch_count_hint(batches, batch_rows, epochs), 'batch')
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
    centroids = _from_working_space(state.centroids, state.shift, options.metric)
    inertia, counts = 0.0, np.zeros(options.k, np.int64)
    for stats, _ in _stream_passes(read_batches(), centroids, options.metric, mesh,
                                   options.chunk_rows, batch_rows, options.matmul_precision):
        totals = _Totals.of(stats)  # over every process's rows
        inertia += totals.inertia
        counts += totals.counts
    return KMeansResult(centroids, inertia, state.batches, converged, counts)


# ---------------------------------------------------------------------------------------------
# Host-side input checks: plain numpy, before any JAX work, so bad input never surfaces as a
# traceback from inside a compiled computation.


def _checked_rows(x, metric: str, what: str, row_offset: int = 0,
                  allow_empty: bool = False) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f'{what}: expected a 2-D array (rows, features), got shape {x.shape}')
    if x.shape[0] == 0 and not allow_empty:
        raise InputError(f'{what}: no rows to cluster (empty input)')
    if x.shape[1] == 0:
        raise InputError(f'{what}: rows have no features (shape {x.shape})')
    if x.dtype.kind not in 'fiub':
        raise InputError(f'{what}: expected numbers, got dtype {x.dtype}')
    if x.dtype not in (np.float16, np.float32):
        x = x.astype(np.float32)  # float64 beyond float32's range turns to Inf: caught below
    _check_finite(x, what, row_offset)
    if metric == COSINE:
        _check_nonzero_norms(x, what, row_offset)
    return x


def _check_finite(x: np.ndarray, what: str, row_offset: int) -> None:
    bad = _bad_rows(x, lambda block: ~np.isfinite(block).all(axis=1))
    if bad.size:
        raise InputError(f'{what}: {_rows(bad.size)} NaN or Inf '
                         f'(first at row {row_offset + bad[0]})')


def _check_nonzero_norms(x: np.ndarray, what: str, row_offset: int) -> None:
    bad = _bad_rows(x, lambda block: ~np.any(block != 0, axis=1))
    if bad.size:
        raise InputError(f'{what} (cosine): {_rows(bad.size, "has", "have")} zero norm '
                         f'(first at row {row_offset + bad[0]}); their direction is undefined')


def _bad_rows(x: np.ndarray, is_bad: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    found = [start + np.flatnonzero(is_bad(x[start:start + _CHECK_BLOCK_ROWS]))
             for start in range(0, x.shape[0], _CHECK_BLOCK_ROWS)]
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def _rows(count: int, singular: str = 'contains', plural: str = 'contain') -> str:
    return f'1 row {singular}' if count == 1 else f'{count} rows {plural}'


def _check_enough_rows(k: int, num_rows: int) -> None:
    if k > num_rows:
        raise InputError(f'k-means: k={k} is larger than the {num_rows} rows to cluster')


def _check_width(batch: np.ndarray, d: int | None, what: str) -> int:
    if d is not None and batch.shape[1] != d:
        raise InputError(f'{what}: rows have {batch.shape[1]} features, expected {d}')
    return batch.shape[1]


def _checked_centroids(centroids, options: KMeansOptions, d: int) -> np.ndarray | None:
    if centroids is None:
        return None
    centroids = _checked_rows(centroids, options.metric, 'k-means init_centroids')
    if centroids.shape != (options.k, d):
        raise InputError(f'k-means: init_centroids has shape {centroids.shape}, '
                         f'expected (k={options.k}, {d})')
    return centroids.astype(np.float32)


def _total_rows(local_rows: int) -> int:
    return int(sharding.gather_over_processes(np.array(local_rows)).sum())


# ---------------------------------------------------------------------------------------------
# The working space: euclidean rows centred on a shift vector, cosine rows unit length.


def _to_working_space(centroids: np.ndarray, shift: np.ndarray, metric: str) -> np.ndarray:
    if metric == COSINE:
        return _unit_rows(centroids.astype(np.float64)).astype(np.float32)
    return (centroids.astype(np.float64) - shift).astype(np.float32)


def _from_working_space(centroids: np.ndarray, shift: np.ndarray, metric: str) -> np.ndarray:
    if metric == COSINE:
        return _unit_rows(centroids.astype(np.float64)).astype(np.float32)
    return (centroids.astype(np.float64) + shift).astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@functools.cache
def _prepare_fn(mesh: Mesh, metric: str):
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

    mapped = jax.shard_map(prepare, mesh=mesh, in_specs=(_ROWS, _ROWS),
                           out_specs=(_ROWS, _WHOLE, _WHOLE))
    rows, whole = sharding.row_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(mapped, in_shardings=(rows, rows), out_shardings=(rows, whole, whole))


@functools.cache
def _transform_fn(mesh: Mesh, metric: str):
    """Raw batch rows -> working float32 rows, given the shift (ignored for cosine)."""

    def transform(x, shift):
        x = x.astype(jnp.float32)
        return _unit_rows_jnp(x) if metric == COSINE else x - shift

    rows = sharding.row_sharding(mesh)
    return jax.jit(transform, in_shardings=(rows, sharding.replicated(mesh)), out_shardings=rows)


def _unit_rows_jnp(x: jax.Array) -> jax.Array:
    norms = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    return jnp.where(norms > 0, x / jnp.where(norms > 0, norms, 1), 0)  # padding rows stay 0


# ---------------------------------------------------------------------------------------------
# One pass over the rows: nearest centroids, per-cluster sums, counts and inertia.


class _PassStats(NamedTuple):
    sums: jax.Array          # (k, d) sums of each cluster's real rows
    counts: jax.Array        # (k,) int32 real rows per cluster
    inertia: jax.Array       # () sum of the real rows' distances
    changed: jax.Array       # () real rows whose id differs from `previous_ids`
    ids: jax.Array           # (rows,) nearest centroid, sharded like the rows
    distances: jax.Array     # (rows,) distance to it


def _split_bfloat16(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x as high + low, both bfloat16: x - (high + low) is ~2^-16 |x|."""
    high = x.astype(jnp.bfloat16)
    return high, (x - high.astype(jnp.float32)).astype(jnp.bfloat16)


def _check_matmul_precision(value: str, what: str) -> None:
    if value not in MATMUL_PRECISIONS:
        raise InputError(f'{what}: matmul_precision must be one of {MATMUL_PRECISIONS}, '
                         f'got {value!r}')


def resolve_matmul_precision(matmul_precision: str, mesh: Mesh | None = None) -> str:
    """'float32' or 'bfloat16_3x': what `matmul_precision` means on this mesh's devices
    (default: JAX's default backend)."""
    _check_matmul_precision(matmul_precision, 'k-means')
    if matmul_precision != 'auto':
        return matmul_precision
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return BFLOAT16_3X if precision.native_bfloat16_products(platform) else FLOAT32


def _splits_products(matmul_precision: str, mesh: Mesh) -> bool:
    return resolve_matmul_precision(matmul_precision, mesh) == BFLOAT16_3X


class _PassRows(NamedTuple):
    """What a pass reads of the rows, derived once before the passes rather than per chunk
    and pass (where the bfloat16 split and the norms cost a fifth of a pass)."""

    x: jax.Array             # (n, d) float32 working rows: the centroid sums
    products: jax.Array      # the rows as the products take them: x, or for bfloat16_3x the
                             # (n, 3d) bits of [high, low, high] (see _split_rows_fn)
    sqnorms: jax.Array       # (n,) |x|^2: the distances
    weights: jax.Array       # (n,) 1 for real rows, 0 for padding


def _pass_rows(rows: jax.Array, weights: jax.Array, mesh: Mesh, split: bool) -> _PassRows:
    sqnorms = _sqnorms_fn(mesh)(rows)
    return _PassRows(rows, _split_rows_fn(mesh)(rows) if split else rows, sqnorms, weights)


@functools.cache
def _sqnorms_fn(mesh: Mesh):
    rows = sharding.row_sharding(mesh)
    return jax.jit(lambda x: jnp.sum(x * x, axis=1), in_shardings=rows, out_shardings=rows)


@functools.cache
def _split_rows_fn(mesh: Mesh):
    def split_rows(x):
        high, low = _split_bfloat16(x)
        # Stacked then reshaped, which XLA:CPU writes 2.5x faster than a concatenation; held
        # as bits, because a bfloat16 array carried through the chunk loop is widened to
        # float32 by XLA:CPU and narrowed again chunk by chunk (a sixth of the pass).
        bits = jax.lax.bitcast_convert_type(jnp.stack([high, low, high], axis=1), jnp.uint16)
        return bits.reshape(x.shape[0], 3 * x.shape[1])

    rows = sharding.row_sharding(mesh)
    return jax.jit(split_rows, in_shardings=rows, out_shardings=rows)


def _split_bfloat16(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x as high + low, both bfloat16: x - (high + low) is ~2^-16 |x|."""
    high = x.astype(jnp.bfloat16)
    return high, (x - high.astype(jnp.float32)).astype(jnp.bfloat16)


def _matmul_lhs(centroids: jax.Array, split: bool) -> jax.Array:
    """The centroids as the products' left side: (k, d) float32, or for bfloat16_3x
    (k, 3d) [high, high, low] against the rows' [high, low, high]: one bfloat16 product with a
    contraction three times as long sums c_hi.x_hi + c_hi.x_lo + c_lo.x_hi in float32
    (c_lo.x_lo, ~2^-16 relative, is left out)."""
    if not split:
        return centroids
    high, low = _split_bfloat16(centroids)
    return jnp.concatenate([high, high, low], axis=1)


def _nearest(sqnorms: jax.Array, product_chunk: jax.Array, lhs: jax.Array,
             half_sqnorms: jax.Array, metric: str):
    """Nearest centroid of each row of a chunk: (ids int32, distances float32).

    `product_chunk` is the chunk as _PassRows.products holds it, `lhs` the centroids as
    _matmul_lhs gives them, `sqnorms` the rows' squared norms. The products are laid out
    (centroids, rows) so that the reductions over centroids run down columns, vectorised across
    rows; on CPU this made the reductions after the matmul cost half as much as with (rows,
    centroids).
    """
    dots = jax.lax.dot_general(lhs, product_chunk, (((1,), (1,)), ((), ())), precision=_HIGHEST,
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


def _local_pass(rows: _PassRows, centroids, previous_ids, *, metric: str, chunk_rows: int,
                with_sums: bool) -> _PassStats:
    """One device's rows, chunk by chunk; padding rows have weight 0."""
    n, d = rows.x.shape
    k = centroids.shape[0]
    chunk = max(1, min(chunk_rows, n))
    half_sqnorms = 0.5 * jnp.sum(centroids * centroids, axis=1)
    split = rows.products.dtype == jnp.uint16   # bfloat16_3x, as bits (see _split_rows_fn)
    lhs = _matmul_lhs(centroids, split)

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
    return _PassStats(total(sums), total(counts), total(inertia), total(changed), ids, distances)


def _chunk_rows(requested: int | None, k: int, mesh: Mesh) -> int:
    """Rows per chunk: as requested, or a power of two that keeps the k x rows block of products
    near 1 MiB on CPU (in cache) and near 64 MiB on accelerators."""
    if requested is not None:
        return requested
    budget = 1 << 18 if mesh.devices.flat[0].platform == 'cpu' else 1 << 24  # float32s
    rows = max(1, budget // max(k, 1))
    return int(min(max(64, 1 << (rows.bit_length() - 1)), 1 << 16))


@functools.cache
def _pass_fn(mesh: Mesh, metric: str, chunk_rows: int, with_sums: bool):
    """jit(shard_map) of `_local_pass`: (_PassRows, centroids, previous ids) -> _PassStats."""
    local = functools.partial(_local_pass, metric=metric, chunk_rows=chunk_rows,
                              with_sums=with_sums)
    specs = _PassStats(_WHOLE, _WHOLE, _WHOLE, _WHOLE, _ROWS, _ROWS)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(_ROWS, _WHOLE, _ROWS), out_specs=specs)
    rows, whole = sharding.row_sharding(mesh), sharding.replicated(mesh)
    shardings = _PassStats(*(rows if spec == _ROWS else whole for spec in specs))
    return jax.jit(mapped, in_shardings=(rows, whole, rows), out_shardings=shardings)


def _no_ids(mesh: Mesh, num_rows: int) -> jax.Array:
    """A 'previous ids' array that differs from every real assignment."""
    return _no_ids_fn(mesh, num_rows)()


@functools.cache
def _no_ids_fn(mesh: Mesh, num_rows: int):
    return jax.jit(lambda: jnp.full((num_rows,), -1, jnp.int32),
                   out_shardings=sharding.row_sharding(mesh))


def _replicate(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array every process holds identically, as one replicated device array."""
    array = np.ascontiguousarray(array)
    return jax.make_array_from_callback(array.shape, sharding.replicated(mesh),
                                        lambda index: array[index])


# ---------------------------------------------------------------------------------------------
# Lloyd iterations


class _Totals(NamedTuple):
    """A pass's reductions, on the host."""

    sums: np.ndarray         # (k, d) float64
    counts: np.ndarray       # (k,) int64
    inertia: float
    changed: int

    @classmethod
    def of(cls, stats: _PassStats) -> _Totals:
        # One transfer for all four: each separate fetch would wait on the device on its own.
        sums, counts, inertia, changed = jax.device_get(
            (stats.sums, stats.counts, stats.inertia, stats.changed))
        return cls(np.asarray(sums, np.float64), np.asarray(counts, np.int64), float(inertia),
                   int(changed))


@dataclasses.dataclass
class _Iterate:
    """What one Lloyd iteration leaves for the next: the centroids and the last pass's labels."""

    centroids: np.ndarray    # (k, d) float32, working space
    ids: jax.Array
    totals: _Totals | None = None


def _lloyd(rows, weights, centroids, shift, spread, options: KMeansOptions,
           mesh: Mesh) -> KMeansResult:
    run_pass = functools.partial(
        _pass_fn(mesh, options.metric, _chunk_rows(options.chunk_rows, options.k, mesh), True),
        _pass_rows(rows, weights, mesh, _splits_products(options.matmul_precision, mesh)))
    state = _Iterate(centroids, _no_ids(mesh, rows.shape[0]))
    tol = options.tol * spread
    labels_stable = converged = False
    bar = _progress_bar(options, options.max_iters, 'iter')
    iterations = 0
    for _ in range(options.max_iters):
        iterations += 1
        stats = run_pass(_replicate(state.centroids, mesh), state.ids)
        totals = _Totals.of(stats)
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
        state.totals = _Totals.of(run_pass(_replicate(state.centroids, mesh), state.ids))
    return KMeansResult(
        centroids=_from_working_space(state.centroids, shift, options.metric),
        inertia=state.totals.inertia,
        iterations=iterations,
        converged=converged,
        counts=state.totals.counts,
    )


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


def _relocate_empty_clusters(totals: _Totals, stats: _PassStats, rows, weights,
                             mesh: Mesh) -> tuple[np.ndarray, np.ndarray, bool]:
    """(sums, counts, whether any cluster was empty), every empty cluster re-seeded.

    As scikit-learn does: the empty clusters take the rows farthest from their centroids (one
    each, farthest first), and those rows leave the clusters they were in.
    """
    empty = np.flatnonzero(totals.counts == 0)
    if not empty.size:
        return totals.sums, totals.counts, False
    far = _farthest_rows(rows, weights, stats.ids, stats.distances, empty.size, mesh)
    sums, counts = totals.sums.copy(), totals.counts.copy()
    for cluster, row, owner in zip(empty, far.rows, far.ids, strict=True):
        sums[owner] -= row
        counts[owner] -= 1
        sums[cluster] = row
        counts[cluster] = 1
    return sums, counts, True


class _FarRows(NamedTuple):
    distances: np.ndarray    # (count,) farthest first
    rows: np.ndarray         # (count, d) float64, working space
    ids: np.ndarray          # (count,) the clusters they are in


def _farthest_rows(rows, weights, ids, distances, count: int, mesh: Mesh) -> _FarRows:
    # Compiled for a power-of-two count so that a varying number of empty clusters reuses code.
    found = _farthest_fn(mesh, 1 << (count - 1).bit_length())(rows, weights, ids, distances)
    distances, rows, ids = (np.asarray(part)[:count] for part in found)
    return _FarRows(distances, rows.astype(np.float64), ids.astype(np.int64))


@functools.cache
def _farthest_fn(mesh: Mesh, count: int):
    """The `count` real rows farthest from their centroids, over all devices, farthest first."""

    def farthest(x, w, ids, distances):
        score = jnp.where(w > 0, distances, -jnp.inf)
        return _global_top(score, (x, ids), count)

    mapped = jax.shard_map(farthest, mesh=mesh, in_specs=(_ROWS,) * 4, out_specs=_WHOLE)
    rows, whole = sharding.row_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(mapped, in_shardings=(rows,) * 4, out_shardings=whole)


def _global_top(score: jax.Array, payloads: tuple, count: int) -> tuple:
    """(scores, *payloads) of the `count` highest scores over all devices; ties: lowest row first.

    Each device keeps its own top `count`, the devices' tops are gathered in device (= row) order,
    and the top of those is taken; lax.top_k puts the lower index first among equal scores.
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


def _progress_bar(options: KMeansOptions, total: int | None, unit: str) -> tqdm:
    show = options.progress and jax.process_index() == 0
    return tqdm(total=total, desc=f'k-means k={options.k}', unit=unit, leave=False,
                disable=None if show else True)


# ---------------------------------------------------------------------------------------------
# Seeding


def _seed_centroids(rows, weights, options: KMeansOptions, mesh: Mesh) -> np.ndarray:
    """k initial centroids in the working space, from options.init."""
    if options.init == RANDOM:
        return _random_rows(rows, weights, options.k, options.seed, mesh)
    if options.init == KMEANS_PARALLEL:
        return _kmeans_parallel(rows, weights, options, mesh)
    return _kmeans_plus_plus(rows, weights, options.k, _key(options.seed, _SEED_PLUS_PLUS), mesh)


def _key(seed: int, purpose: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), purpose)


def _random_rows(rows, weights, k: int, seed: int, mesh: Mesh) -> np.ndarray:
    """k distinct real rows, uniformly at random."""
    return np.asarray(_random_rows_fn(mesh, k)(rows, weights, _key(seed, _SEED_RANDOM)))


@functools.cache
def _random_rows_fn(mesh: Mesh, k: int):
    def pick(x, w, u):
        return _global_top(jnp.where(w > 0, -u, -jnp.inf), (x,), k)[1]

    mapped = jax.shard_map(pick, mesh=mesh, in_specs=(_ROWS, _ROWS, _ROWS), out_specs=_WHOLE)
    rows = sharding.row_sharding(mesh)

    def random_rows(x, w, key):
        # Drawn for the global array: a row's draw depends on its index, not on the device count.
        u = jax.lax.with_sharding_constraint(jax.random.uniform(key, w.shape), rows)
        return mapped(x, w, u)

    return jax.jit(random_rows, in_shardings=(rows, rows, sharding.replicated(mesh)),
                   out_shardings=sharding.replicated(mesh))


def _kmeans_plus_plus(rows, weights, k: int, key: jax.Array, mesh: Mesh) -> np.ndarray:
    """Greedy k-means++ (Arthur & Vassilvitskii 2007; scikit-learn's variant): each new centre is
    the best of 2 + ln k rows sampled with probability proportional to weight x squared distance
    to the nearest centre so far, 'best' meaning the one that lowers the potential most."""
    trials = 2 + int(math.log(k))
    return np.asarray(_plus_plus_fn(mesh, k, trials)(rows, weights, key))


@functools.cache
def _plus_plus_fn(mesh: Mesh, k: int, trials: int):
    def plus_plus(x, w, key):
        sqnorms = jnp.sum(x * x, axis=1)

        def distances_to(points):  # (rows, len(points)); the whole local shard at once is fine:
            dots = jnp.dot(x, points.T, precision=_HIGHEST)  # only a few columns
            return jnp.maximum(sqnorms[:, None] - 2 * dots + jnp.sum(points * points, axis=1), 0)

        first = _sample_rows(x, w, jax.random.uniform(jax.random.fold_in(key, 0), (1,)))
        closest = distances_to(first)[:, 0]
        centroids = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(first[0])

        def add_centre(j, carry):
            centroids, closest = carry
            u = jax.random.uniform(jax.random.fold_in(key, j), (trials,))
            candidates = _sample_rows(x, w * closest, u)
            reach = jnp.minimum(closest[:, None], distances_to(candidates))
            potentials = jax.lax.psum(w @ reach, sharding.ROW_AXES)
            best = jnp.argmin(potentials)
            return centroids.at[j].set(candidates[best]), reach[:, best]

        centroids, _ = jax.lax.fori_loop(1, k, add_centre, (centroids, closest))
        return centroids

    mapped = jax.shard_map(plus_plus, mesh=mesh, in_specs=(_ROWS, _ROWS, _WHOLE),
                           out_specs=_WHOLE)
    rows, whole = sharding.row_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(mapped, in_shardings=(rows, rows, whole), out_shardings=whole)


def _sample_rows(x: jax.Array, potential: jax.Array, u: jax.Array) -> jax.Array:
    """Rows drawn with probability proportional to `potential`, one per uniform draw in `u`.

    Inverse CDF over the rows of all devices in order: device i owns the draws that land in
    [its start, its end) of the global cumulative potential, so the row picked for a draw does not
    depend on how rows are split. Returns (len(u), d), the same on every device.
    """
    cumulative = jnp.cumsum(potential)
    totals = jax.lax.all_gather(cumulative[-1], sharding.ROW_AXES)
    ends = jnp.cumsum(totals)
    starts = jnp.concatenate([jnp.zeros(1, ends.dtype), ends[:-1]])
    me = jax.lax.axis_index(sharding.ROW_AXES)
    target = jnp.minimum(u * ends[-1], jnp.nextafter(ends[-1], 0))
    owned = (starts[me] <= target) & (target < ends[me])
    local_target = jnp.minimum(target - starts[me], jnp.nextafter(cumulative[-1], 0))
    # The first row whose cumulative potential exceeds the target: never a row of potential 0.
    index = jnp.clip(jnp.searchsorted(cumulative, local_target, side='right'), 0,
                     x.shape[0] - 1)
    return jax.lax.psum(jnp.where(owned[:, None], x[index], 0), sharding.ROW_AXES)


def _kmeans_parallel(rows, weights, options: KMeansOptions, mesh: Mesh) -> np.ndarray:
    """k-means|| (Bahmani et al. 2012): a few passes that each keep every row with probability
    oversampling * k * its share of the potential, then weighted k-means++ on the candidates."""
    k = options.k
    key = _key(options.seed, _SEED_PARALLEL)

    no_ids = _no_ids(mesh, rows.shape[0])
    pass_rows = _pass_rows(rows, weights, mesh,
                           _splits_products(options.matmul_precision, mesh))

    def distance_pass(candidates: np.ndarray) -> _PassStats:
        padded = _padded_candidates(candidates)
        chunk_rows = _chunk_rows(options.chunk_rows, padded.shape[0], mesh)
        return _pass_fn(mesh, EUCLIDEAN, chunk_rows, False)(
            pass_rows, _replicate(padded, mesh), no_ids)

    candidates = _kmeans_plus_plus(rows, weights, 1, jax.random.fold_in(key, 0), mesh)
    first = distance_pass(candidates)
    # Each row's distance to, and index of, its nearest candidate so far: the candidates'
    # weights come from these, with no pass over all candidates at the end.
    closest, nearest = first.distances, first.ids
    local_rows = rows.shape[0] // sharding.num_row_shards(mesh)
    capacity = min(local_rows, int(2 * options.oversampling * k) + 16)
    oversample = _oversample_fn(mesh, capacity)
    for round_index in range(1, options.init_rounds + 1):
        picked, valid = oversample(rows, weights, closest, jax.random.fold_in(key, round_index),
                                   np.float32(options.oversampling * k))
        new = np.asarray(picked)[np.asarray(valid)]
        if not new.size:
            break
        stats = distance_pass(new)
        closest, nearest = _keep_nearer_fn(mesh)(closest, nearest, stats.distances, stats.ids,
                                                 np.int32(candidates.shape[0]))
        candidates = np.concatenate([candidates, new])
    if candidates.shape[0] <= k:  # too few rows stand apart: plain k-means++ on all rows
        return _kmeans_plus_plus(rows, weights, k, _key(options.seed, _SEED_PLUS_PLUS), mesh)
    bucket = _padded_candidates(candidates).shape[0]
    attracted = _count_fn(mesh, bucket)(weights, nearest)
    candidate_weights = np.asarray(attracted)[:candidates.shape[0]]
    return _recluster(candidates, candidate_weights, k, _key(options.seed, _SEED_RECLUSTER))


@functools.cache
def _keep_nearer_fn(mesh: Mesh):
    """(closest, nearest, new distances, new ids, first new id) -> the nearer of the two, per row;
    on a tie the earlier candidate stays."""

    def keep_nearer(closest, nearest, distances, ids, offset):
        nearer = distances < closest
        return jnp.where(nearer, distances, closest), jnp.where(nearer, ids + offset, nearest)

    rows, whole = sharding.row_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(keep_nearer, in_shardings=(rows, rows, rows, rows, whole),
                   out_shardings=(rows, rows))


@functools.cache
def _count_fn(mesh: Mesh, size: int):
    """(weights, ids) -> (size,) int32 real rows per id, over all devices."""

    def count(w, ids):
        members = jnp.where(w > 0, ids, size)  # padding rows: out of range, dropped
        return jax.lax.psum(jax.ops.segment_sum(jnp.ones_like(ids), members, size),
                            sharding.ROW_AXES)

    mapped = jax.shard_map(count, mesh=mesh, in_specs=(_ROWS, _ROWS), out_specs=_WHOLE)
    rows = sharding.row_sharding(mesh)
    return jax.jit(mapped, in_shardings=(rows, rows), out_shardings=sharding.replicated(mesh))


def _padded_candidates(candidates: np.ndarray) -> np.ndarray:
    """Pads with copies of the first row (never nearer than it), so few shapes get compiled."""
    size = -(-candidates.shape[0] // _CANDIDATE_BUCKET) * _CANDIDATE_BUCKET
    padding = np.repeat(candidates[:1], size - candidates.shape[0], axis=0)
    return np.concatenate([candidates, padding]).astype(np.float32)


@functools.cache
def _oversample_fn(mesh: Mesh, capacity: int):
    """(rows, weights, closest, key, l) -> (picked rows, valid): each row kept independently with
    probability min(1, l * w * closest / potential); at most `capacity` rows per device."""

    def oversample(x, w, closest, u, factor):
        potential = jax.lax.psum(jnp.sum(w * closest), sharding.ROW_AXES)
        keep = u < jnp.minimum(1.0, factor * w * closest / potential)
        (index,) = jnp.nonzero(keep, size=capacity, fill_value=0)
        return x[index], jnp.arange(capacity) < jnp.sum(keep)

    mapped = jax.shard_map(oversample, mesh=mesh, in_specs=(_ROWS, _ROWS, _ROWS, _ROWS, _WHOLE),
                           out_specs=(_ROWS, _ROWS))
    rows, whole = sharding.row_sharding(mesh), sharding.replicated(mesh)

    def run(x, w, closest, key, factor):
        u = jax.lax.with_sharding_constraint(jax.random.uniform(key, w.shape), rows)
        return mapped(x, w, closest, u, factor)

    return jax.jit(run, in_shardings=(rows, rows, rows, whole, whole),
                   out_shardings=(whole, whole))


def _recluster(candidates: np.ndarray, candidate_weights: np.ndarray, k: int,
               key: jax.Array) -> np.ndarray:
    """Weighted k-means++ on the k-means|| candidates, on this process's first device: every
    process holds the same candidates and computes the same centres, with no communication."""
    mesh = sharding.make_mesh(devices=jax.local_devices()[:1])
    place = functools.partial(jax.device_put, device=sharding.row_sharding(mesh))
    return _kmeans_plus_plus(place(candidates.astype(np.float32)),
                             place(candidate_weights.astype(np.float32)), k, key, mesh)


# ---------------------------------------------------------------------------------------------
# Streaming assignment and mini-batch updates


def _stream_passes(batches, centroids, metric: str, mesh: Mesh | None, chunk_rows: int | None,
                   batch_rows: int, matmul_precision: str) -> Iterator[tuple[_PassStats, int]]:
    """Streams each batch through the devices: yields (its pass, its number of local rows)."""
    if metric not in METRICS:
        raise InputError(f'k-means assign: metric must be one of {METRICS}, got {metric!r}')
    _check_matmul_precision(matmul_precision, 'k-means assign')
    centroids = _checked_rows(centroids, metric, 'k-means assign: centroids')
    mesh = mesh if mesh is not None else sharding.make_mesh()
    # Centring both sides on the centroids' mean keeps the matmul form of the distance accurate.
    shift = centroids.astype(np.float64).mean(axis=0) if metric == EUCLIDEAN else None
    working = _replicate(_to_working_space(centroids, shift, metric), mesh)
    shift = _replicate(np.zeros(centroids.shape[1], np.float32) if shift is None
                       else shift.astype(np.float32), mesh)
    chunk_rows = _chunk_rows(chunk_rows, centroids.shape[0], mesh)
    run_pass = _pass_fn(mesh, metric, chunk_rows, False)
    split = _splits_products(matmul_precision, mesh)
    row_offset = 0
    for batch in _split_if_array(batches, batch_rows):
        batch = _checked_rows(batch, metric, 'k-means assign', row_offset, allow_empty=True)
        row_offset += batch.shape[0]
        _check_width(batch, centroids.shape[1], 'k-means assign')
        rows, weights = _put_batch(batch, mesh, chunk_rows)
        rows = _transform_fn(mesh, metric)(rows, shift)
        stats = run_pass(_pass_rows(rows, weights, mesh, split), working,
                         _no_ids(mesh, rows.shape[0]))
        yield stats, batch.shape[0]


def _split_if_array(batches, batch_rows: int) -> Iterable:
    if isinstance(batches, np.ndarray):
        return [batches[start:start + batch_rows]
                for start in range(0, max(batches.shape[0], 1), batch_rows)]
    return batches


def _put_batch(batch: np.ndarray, mesh: Mesh, chunk_rows: int) -> tuple[jax.Array, jax.Array]:
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


def _batch_source(batches, batch_rows: int, epochs: int) -> Callable[[], Iterable[np.ndarray]]:
    """A callable that returns a fresh pass over the batches."""
    if callable(batches):
        return batches
    if isinstance(batches, np.ndarray):
        return lambda: _split_if_array(batches, batch_rows)
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
        _check_enough_rows(options.k, _total_rows(count))
    return np.concatenate(taken)


def _checked_batches(batches: Iterable, metric: str, width: int | None) -> Iterator[np.ndarray]:
    """The batches, each checked like fit's input, with row numbers counted across batches."""
    row_offset = 0
    for batch in batches:
        batch = _checked_rows(batch, metric, 'k-means mini-batch', row_offset, allow_empty=True)
        row_offset += batch.shape[0]
        width = _check_width(batch, width, 'k-means mini-batch')
        yield batch


def _start_minibatch(sample: np.ndarray, options: KMeansOptions, mesh: Mesh,
                     init_centroids) -> _MiniBatchState:
    """Seeds from the sample (or takes init_centroids) and fixes the working space from it."""
    init_centroids = _checked_centroids(init_centroids, options, sample.shape[1])
    raw, weights = sharding.put_rows(sample, mesh)
    rows, shift, spread = _prepare_fn(mesh, options.metric)(raw, weights)
    shift = np.asarray(shift, np.float64)
    if init_centroids is None:
        centroids = _seed_centroids(rows, weights, options, mesh)
    else:
        centroids = _to_working_space(init_centroids, shift, options.metric)
    return _MiniBatchState(centroids, centroids.astype(np.float64), np.zeros(options.k),
                           shift, float(spread))


def _minibatch_step(state: _MiniBatchState, batch: np.ndarray, options: KMeansOptions,
                    mesh: Mesh) -> float:
    """Moves the centroids to the running means including this batch; returns its inertia."""
    chunk_rows = _chunk_rows(options.chunk_rows, options.k, mesh)
    rows, weights = _put_batch(batch, mesh, chunk_rows)
    rows = _transform_fn(mesh, options.metric)(rows, _replicate(state.shift.astype(np.float32),
                                                                mesh))
    split = _splits_products(options.matmul_precision, mesh)
    stats = _pass_fn(mesh, options.metric, chunk_rows, True)(
        _pass_rows(rows, weights, mesh, split), _replicate(state.centroids, mesh),
        _no_ids(mesh, rows.shape[0]))
    totals = _Totals.of(stats)
    hit = totals.counts > 0
    counts = state.counts + totals.counts
    state.means[hit] = ((state.means[hit] * state.counts[hit, None] + totals.sums[hit])
                        / counts[hit, None])
    state.counts = counts
    empty = np.flatnonzero(state.counts == 0)
    if empty.size and totals.counts.sum() >= empty.size:
        # A centroid no row has reached yet restarts at one of the batch's outlying rows.
        far = _farthest_rows(rows, weights, stats.ids, stats.distances, empty.size, mesh)
        state.means[empty] = far.rows
        state.counts[empty] = 1
    state.centroids = (_unit_rows(state.means) if options.metric == COSINE
                       else state.means).astype(np.float32)
    state.batches += 1
    return totals.inertia
