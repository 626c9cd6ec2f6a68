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
  centroid, taken out of that point's cluster. When the rows hold fewer than k distinct values
  some clusters stay empty: KMeansResult.empty_clusters counts them and a warning is logged.
* Random draws depend on the seed and a row's global index only, so a fit gives the same result
  on any number of devices (up to float rounding in the cross-device sums).

Inputs may be float16 (stored embeddings); all arithmetic is float32, except that with
matmul_precision='bfloat16_3x' the rows x centroids products are three bfloat16 products summed
in float32 (each side split as high + low; ~1e-5 of |x||c| against float32's ~1e-7). On a CPU
with AMX a pass is then ~1.2x faster, and the fits in bench/kmeans_bench.py end with the same
assignments as scikit-learn's in either precision. Rows are checked on the host before any of
that (checks.py): NaN / Inf rows, zero cosine rows and euclidean rows beyond float32 arithmetic
are refused by row number; cosine rows of extreme norm (below 2^-40 or above 2^40, whose float32
squares would underflow or overflow) are scaled to unit length in float64 first.

On CPU, give XLA one device per core (XLA_FLAGS=--xla_force_host_platform_device_count=<cores>,
set before JAX starts) and pass the default mesh: XLA runs a device's matmuls on every core but
the reductions and the scatter after them on one thread, so a shard per core made a Lloyd pass
1.4x faster (bench/README.md).

Modules, each importing only those listed before it:

  options     KMeansOptions, KMeansResult, the names of metrics, inits and precisions
  checks      host-side input checks (NaN / Inf, zero or extreme norms, widths, k vs rows)
  shards      partition specs, replicated host arrays, the top rows over every device
  matmul      float32 or bfloat16_3x products: resolve_matmul_precision, the bfloat16 split
  space       the working space (centred or unit rows) and the maps into it and back
  passes      one pass over the rows: nearest centroids, sums, counts, inertia; farthest rows
  seeding     random rows, k-means++, k-means||
  lloyd       fit: Lloyd iterations, convergence, empty-cluster re-seeding
  assign      assign: streamed nearest-centroid passes
  minibatch   fit_minibatch
"""

from vise_jax.cluster.kmeans.assign import assign
from vise_jax.cluster.kmeans.lloyd import fit
from vise_jax.cluster.kmeans.matmul import resolve_matmul_precision
from vise_jax.cluster.kmeans.minibatch import fit_minibatch
from vise_jax.cluster.kmeans.options import (
                                             BFLOAT16_3X,
                                             COSINE,
                                             EUCLIDEAN,
                                             FLOAT32,
                                             INITS,
                                             KMEANS_PARALLEL,
                                             KMEANS_PLUS_PLUS,
                                             MATMUL_PRECISIONS,
                                             METRICS,
                                             RANDOM,
                                             KMeansOptions,
                                             KMeansResult,
)

__all__ = ['BFLOAT16_3X', 'COSINE', 'EUCLIDEAN', 'FLOAT32', 'INITS', 'KMEANS_PARALLEL',
           'KMEANS_PLUS_PLUS', 'MATMUL_PRECISIONS', 'METRICS', 'RANDOM', 'KMeansOptions',
           'KMeansResult', 'assign', 'fit', 'fit_minibatch', 'resolve_matmul_precision']
