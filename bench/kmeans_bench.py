"""k-means: vise_jax against scikit-learn (lloyd) and faiss-cpu, measured in the same process.

All three cluster the same float32 data from the same initial centroids with the same Lloyd
iterations (faiss without sub-sampling). Prints wall time per run (best of --repeats, with the
median), time and inertia ratios, GFLOP/s of the distance matmul, JAX's compile time, and the
time per iteration as N grows. Needs faiss and scikit-learn beside JAX, so run it with the
peers' virtual environment, and unset OpenBLAS overrides that slow numpy on some processors:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
        /work/peer-venv/bin/python bench/kmeans_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import time
from collections.abc import Callable

# One XLA CPU device per core (unless XLA_FLAGS says otherwise): k-means then runs one shard per
# core, and the work after each matmul (reductions, the centroid scatter), which XLA runs on one
# thread per device, runs on every core. Must be set before JAX starts.
os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count={os.cpu_count()}')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vise_jax import sharding  # noqa: E402
from vise_jax.cluster import kmeans  # noqa: E402

# Sizes of the full run (the job) and of --quick (a smoke test that takes seconds).
FULL = dict(n=100_000, d=384, k=1000, scaling=(25_000, 50_000, 100_000, 200_000))
QUICK = dict(n=5_000, d=64, k=50, scaling=(2_500, 5_000, 10_000, 20_000))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='small sizes, for a smoke test')
    parser.add_argument('--n', type=int, help='rows (default 100k, or 5k with --quick)')
    parser.add_argument('--d', type=int, help='features (default 384)')
    parser.add_argument('--k', type=int, help='clusters (default 1000)')
    parser.add_argument('--iters', type=int, default=10, help='Lloyd iterations')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs; the best is kept')
    parser.add_argument('--chunk-rows', type=int, help='rows per chunk (default: sized to k)')
    parser.add_argument('--threads', type=int, default=os.cpu_count(),
                        help='threads for the peers (JAX uses every core)')
    parser.add_argument('--precisions', default='float32,auto',
                        help="vise_jax's matmul_precision values to time (comma-separated; "
                             "'auto' is bfloat16_3x on CPUs with AMX)")
    parser.add_argument('--skip-peers', action='store_true', help='time vise_jax only')
    parser.add_argument('--skip-scaling', action='store_true')
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    for name in ('n', 'd', 'k'):
        if getattr(args, name) is None:
            setattr(args, name, sizes[name])
    args.scaling_sizes = sizes['scaling']
    return args


def make_data(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows, initial centroids): Gaussian blobs around k centres; k random rows to start from."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (k, d)).astype(np.float32)
    rows = centres[rng.integers(0, k, n)] + rng.normal(0.0, 1.5, (n, d)).astype(np.float32)
    start = rows[rng.choice(n, k, replace=False)]
    return rows, start


@dataclasses.dataclass
class Contender:
    """One implementation: how to fit, and how to read a fit's inertia and iteration counts."""

    name: str
    fit: Callable[[], object]
    inertia: Callable[[object], float]
    iterations: Callable[[object], int]
    passes: Callable[[object], int]      # assignment passes over the data (matmuls)
    labels: Callable[[object], np.ndarray]   # each row's cluster under the final centroids
    limit_threads: Callable[[], object] = contextlib.nullcontext
    seconds: list = dataclasses.field(default_factory=list)
    result: object = None


def final_labels(rows, centroids) -> np.ndarray:
    """Each row's nearest centroid, by vise_jax in float32 (untimed)."""
    return kmeans.assign(rows, centroids)[0]


def ours(rows, start, iters: int, chunk_rows: int | None, final_assignment: bool = True,
         matmul_precision: str = kmeans.FLOAT32) -> Contender:
    """vise_jax.cluster.kmeans.fit; by default it assigns the rows once more after the last
    update (as scikit-learn does), so that its inertia describes the returned centroids;
    without that pass it does faiss's work, and its final inertia is measured untimed."""
    options = kmeans.KMeansOptions(k=start.shape[0], max_iters=iters, tol=0.0,
                                   chunk_rows=chunk_rows, final_assignment=final_assignment,
                                   matmul_precision=matmul_precision, progress=False)

    def inertia(result) -> float:
        if final_assignment:
            return result.inertia
        return float(np.sum(kmeans.assign(rows, result.centroids)[1], dtype=np.float64))

    def passes(result) -> int:
        return result.iterations + int(final_assignment and not result.converged)

    name = 'vise_jax' + ('' if matmul_precision == kmeans.FLOAT32 else ' 3xbf16')
    return Contender(name + ('' if final_assignment else ' lean'),
                     lambda: kmeans.fit(rows, options, init_centroids=start),
                     inertia=inertia, iterations=lambda result: result.iterations,
                     passes=passes, labels=lambda result: final_labels(rows, result.centroids))


def sklearn_lloyd(rows, start, iters: int, threads: int) -> Contender:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    def fit():
        return KMeans(start.shape[0], init=start, n_init=1, max_iter=iters, tol=0.0,
                      algorithm='lloyd').fit(rows)

    return Contender(
        'scikit-learn', fit, inertia=lambda result: float(result.inertia_),
        iterations=lambda result: int(result.n_iter_),
        passes=lambda result: int(result.n_iter_) + 1,  # it also assigns once more at the end
        labels=lambda result: result.labels_,
        limit_threads=lambda: threadpool_limits(limits=threads))


def faiss_kmeans(rows, start, iters: int, threads: int) -> Contender:
    import faiss

    faiss.omp_set_num_threads(threads)
    n, d = rows.shape

    def fit():
        # No sub-sampling (faiss keeps at most max_points_per_centroid * k rows by default).
        clustering = faiss.Kmeans(d, start.shape[0], niter=iters, max_points_per_centroid=n,
                                  min_points_per_centroid=1, verbose=False)
        clustering.train(rows, init_centroids=start)
        return clustering

    def inertia(result) -> float:
        # faiss reports each iteration's inertia before its update; measure the final
        # centroids' inertia the way the others do (untimed).
        _, distances = kmeans.assign(rows, result.centroids)
        return float(np.sum(distances, dtype=np.float64))

    return Contender('faiss', fit, inertia=inertia, iterations=lambda result: iters,
                     passes=lambda result: iters,
                     labels=lambda result: final_labels(rows, result.centroids))


def race(contenders: list[Contender], repeats: int) -> None:
    """Times every contender once per round, round after round, so that load from other work
    on the machine falls on all of them alike; the best round of each is reported."""
    for contender in contenders:
        with contender.limit_threads():
            contender.result = contender.fit()  # warm up (and compile, for JAX)
    for _ in range(repeats):
        for contender in contenders:
            with contender.limit_threads():
                begin = time.perf_counter()
                contender.fit()
                contender.seconds.append(time.perf_counter() - begin)


@contextlib.contextmanager
def compile_seconds():
    """Yields a list whose sum is the time JAX spends tracing, lowering and compiling inside."""
    spent = []

    def listen(event: str, seconds: float, **_) -> None:
        if event.startswith('/jax/core/compile/'):
            spent.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield spent
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def gflops(contender: Contender, n: int, d: int, k: int) -> float:
    """Distance-matmul GFLOP/s: 2 N K D per assignment pass, over the best round's time."""
    return 2.0 * n * k * d * contender.passes(contender.result) / min(contender.seconds) / 1e9


def per_iteration_seconds(n: int, d: int, k: int, chunk_rows: int | None, repeats: int,
                          matmul_precision: str) -> float:
    """Seconds per Lloyd iteration: the difference of a 5- and a 2-iteration fit run one after
    the other (so fixed costs cancel, and both meet the same load), the median over rounds."""
    rows, start = make_data(n, d, k, seed=1)
    short, long = (ours(rows, start, iters, chunk_rows, matmul_precision=matmul_precision)
                   for iters in (2, 5))
    race([short, long], repeats)
    differences = np.subtract(long.seconds, short.seconds) / 3
    return float(np.median(differences))


def describe_machine(threads: int) -> None:
    print(f'date: {datetime.date.today()}  machine: {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} cores; peers limited to {threads} threads')
    xla_flags = os.environ.get('XLA_FLAGS', '')
    print(f'jax {jax.__version__} on {jax.devices()}; XLA_FLAGS={xla_flags!r}')
    for name in ('OPENBLAS_CORETYPE', 'OPENBLAS_L2_SIZE'):
        if name in os.environ:
            print(f'warning: {name}={os.environ[name]} is set; it can slow numpy and the peers')


def describe_peers() -> None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return
    for pool in threadpool_info():
        print(f'  threadpool: {pool.get("internal_api")} {pool.get("version")} '
              f'({pool.get("architecture", "-")}, {pool.get("num_threads")} threads) '
              f'{os.path.basename(pool.get("filepath", ""))}')


def report_comparison(contenders: list[Contender], compile_time: float, n: int, d: int,
                      k: int) -> None:
    print(f'\nk-means N={n} D={d} K={k}, float32, same initial centroids, '
          f'{len(contenders[0].seconds)} rounds')
    reference = next((peer for peer in contenders if peer.name == 'scikit-learn'), None)
    reference_labels = reference.labels(reference.result) if reference else None
    print(f'{"":22s}{"best s":>9s}{"median s":>10s}{"iters":>7s}{"passes":>8s}'
          f'{"ms/pass":>9s}{"GFLOP/s":>9s}{"inertia":>16s}{"same ids as sklearn":>21s}')
    for contender in contenders:
        result, best = contender.result, min(contender.seconds)
        passes = contender.passes(result)
        same = ('' if reference_labels is None else
                f'{np.mean(contender.labels(result) == reference_labels):.6f}')
        print(f'{contender.name:22s}{best:9.3f}{np.median(contender.seconds):10.3f}'
              f'{contender.iterations(result):7d}{passes:8d}{best / passes * 1e3:9.1f}'
              f'{gflops(contender, n, d, k):9.1f}{contender.inertia(result):16.8g}{same:>21s}')
    print(f'vise_jax compile time (trace, lower, compile; first calls only): '
          f'{compile_time:.2f} s')
    ours = [contender for contender in contenders if contender.name.startswith('vise_jax')]
    peers = [contender for contender in contenders if contender not in ours]
    for mine in ours:
        for peer in peers:
            ratio = min(mine.seconds) / min(peer.seconds)
            per_pass = ratio * peer.passes(peer.result) / mine.passes(mine.result)
            print(f'time ratio {mine.name} / {peer.name}: {ratio:.3f} per run, '
                  f'{per_pass:.3f} per assignment pass')
    if reference is not None:
        reference_inertia = reference.inertia(reference.result)
        for contender in contenders:
            if contender is not reference:
                print(f'inertia ratio {contender.name} / scikit-learn: '
                      f'{contender.inertia(contender.result) / reference_inertia:.7f}')


def report_scaling(sizes, d: int, k: int, chunk_rows: int | None, repeats: int,
                   matmul_precision: str) -> None:
    print(f'\nscaling: vise_jax time per Lloyd iteration, D={d} K={k}, '
          f'matmul_precision={matmul_precision}')
    print(f'{"N":>9s}{"s/iter":>10s}{"ns/point":>10s}{"GFLOP/s":>9s}')
    for n in sizes:
        seconds = per_iteration_seconds(n, d, k, chunk_rows, repeats, matmul_precision)
        print(f'{n:9d}{seconds:10.4f}{seconds / n * 1e9:10.1f}'
              f'{2.0 * n * k * d / seconds / 1e9:9.1f}', flush=True)


def main() -> None:
    args = parse_args()
    describe_machine(args.threads)
    rows, start = make_data(args.n, args.d, args.k)
    mesh = sharding.make_mesh()
    # 'auto' and an explicit value may be the same thing on this machine: time it once.
    precisions = dict.fromkeys(kmeans.resolve_matmul_precision(name, mesh)
                               for name in args.precisions.split(','))
    contenders = [ours(rows, start, args.iters, args.chunk_rows, final_assignment, precision)
                  for precision in precisions for final_assignment in (True, False)]
    if not args.skip_peers:
        contenders.append(faiss_kmeans(rows, start, args.iters, args.threads))
        contenders.append(sklearn_lloyd(rows, start, args.iters, args.threads))
    with compile_seconds() as compiling:
        race(contenders, args.repeats)
    describe_peers()
    report_comparison(contenders, sum(compiling), args.n, args.d, args.k)
    if not args.skip_scaling:
        report_scaling(args.scaling_sizes, args.d, args.k, args.chunk_rows, args.repeats,
                       list(precisions)[-1])


if __name__ == '__main__':
    main()
