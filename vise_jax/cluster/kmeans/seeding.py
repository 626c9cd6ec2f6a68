"""Initial centroids: k distinct random rows, greedy k-means++, or k-means||."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vise_jax import sharding
from vise_jax.cluster.kmeans import checks
from vise_jax.cluster.kmeans.matmul import HIGHEST, splits_products
from vise_jax.cluster.kmeans.options import EUCLIDEAN, KMEANS_PARALLEL, RANDOM, KMeansOptions
from vise_jax.cluster.kmeans.passes import PassStats, chunk_rows, no_ids, pass_fn, pass_rows
from vise_jax.cluster.kmeans.shards import ROWS, WHOLE, global_top, replicate
from vise_jax.cluster.kmeans.space import prepare_fn, to_working_space

_CANDIDATE_BUCKET = 256       # k-means|| candidate sets are padded to a multiple of this
# Purposes of the random streams derived from the seed; distinct so that no two draws correlate.
_SEED_PLUS_PLUS, _SEED_RANDOM, _SEED_PARALLEL, _SEED_RECLUSTER = range(4)


def seed_centroids(rows, weights, options: KMeansOptions, mesh: Mesh) -> np.ndarray:
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
        return global_top(jnp.where(w > 0, -u, -jnp.inf), (x,), k)[1]

    mapped = jax.shard_map(pick, mesh=mesh, in_specs=(ROWS, ROWS, ROWS), out_specs=WHOLE)
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
            dots = jnp.dot(x, points.T, precision=HIGHEST)  # only a few columns
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

    mapped = jax.shard_map(plus_plus, mesh=mesh, in_specs=(ROWS, ROWS, WHOLE),
                           out_specs=WHOLE)
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

    unassigned = no_ids(mesh, rows.shape[0])
    read = pass_rows(rows, weights, mesh, splits_products(options.matmul_precision, mesh))

    def distance_pass(candidates: np.ndarray) -> PassStats:
        padded = _padded_candidates(candidates)
        chunk = chunk_rows(options.chunk_rows, padded.shape[0], mesh)
        return pass_fn(mesh, EUCLIDEAN, chunk, False)(read, replicate(padded, mesh), unassigned)

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

    mapped = jax.shard_map(count, mesh=mesh, in_specs=(ROWS, ROWS), out_specs=WHOLE)
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

    mapped = jax.shard_map(oversample, mesh=mesh, in_specs=(ROWS, ROWS, ROWS, ROWS, WHOLE),
                           out_specs=(ROWS, ROWS))
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


def start(x: np.ndarray, options: KMeansOptions, init_centroids: np.ndarray | None, mesh: Mesh,
          what: str):
    """The rows on the mesh in the working space, and the centroids k-means starts from.

    Returns (rows, weights, centroids, shift, spread); `init_centroids` (already checked)
    replaces the seeding given by `options.init`; `what` names the caller in errors.
    """
    raw, weights = sharding.put_rows(x, mesh)
    rows, shift, spread = prepare_fn(mesh, options.metric)(raw, weights)
    del raw
    shift = np.asarray(shift, np.float64)
    spread = float(spread)
    checks.check_spread(spread, what)
    if init_centroids is None:
        centroids = seed_centroids(rows, weights, options, mesh)
    else:
        centroids = to_working_space(init_centroids, shift, options.metric)
    return rows, weights, centroids, shift, spread
