"""JAX k-means against scikit-learn and a numpy reference, on 8 fake CPU devices."""

import logging
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from sklearn.cluster import KMeans

from vise_jax import precision, sharding
from vise_jax.cluster import kmeans
from vise_jax.cluster.kmeans import checks as kmeans_checks
from vise_jax.cluster.kmeans import matmul as kmeans_matmul
from vise_jax.errors import InputError


def blobs(n: int, d: int, centres: int, seed: int = 0, spread: float = 1.0,
          separation: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """(rows float32, true centres): Gaussian blobs around centres drawn with `separation` scale."""
    rng = np.random.default_rng(seed)
    true_centres = rng.normal(0, separation, (centres, d))
    members = rng.integers(0, centres, n)
    rows = true_centres[members] + rng.normal(0, spread, (n, d))
    return rows.astype(np.float32), true_centres


def options(k: int, **overrides) -> kmeans.KMeansOptions:
    return kmeans.KMeansOptions(k=k, progress=False, **overrides)


def one_device_mesh():
    return sharding.make_mesh(devices=jax.devices()[:1])


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize('matmul_precision', ['float32', 'bfloat16_3x'])
@pytest.mark.parametrize('n, d, k', [(1003, 5, 6), (517, 16, 12), (2000, 3, 30)])
def test_lloyd_matches_sklearn_from_the_same_start(n, d, k, matmul_precision):
    x, _ = blobs(n, d, k, seed=n, spread=1.5, separation=3.0)
    init = x[np.random.default_rng(1).choice(n, k, replace=False)]
    ours = kmeans.fit(x, options(k, max_iters=50, tol=1e-4, matmul_precision=matmul_precision),
                      init_centroids=init)
    theirs = KMeans(k, init=init, n_init=1, algorithm='lloyd', max_iter=50, tol=1e-4).fit(x)
    ids, distances = kmeans.assign(x, ours.centroids)
    np.testing.assert_array_equal(ids, theirs.labels_)
    assert relative(ours.inertia, theirs.inertia_) < 1e-4
    assert relative(float(distances.sum()), theirs.inertia_) < 1e-4
    assert ours.iterations == theirs.n_iter_
    np.testing.assert_allclose(ours.centroids, theirs.cluster_centers_, atol=1e-4)
    np.testing.assert_array_equal(ours.counts, np.bincount(theirs.labels_, minlength=k))


def test_sklearn_agreement_holds_when_iterations_run_out():
    x, _ = blobs(1500, 8, 20, seed=3, spread=2.0, separation=2.0)
    init = x[:20]
    ours = kmeans.fit(x, options(20, max_iters=3, tol=0.0), init_centroids=init)
    theirs = KMeans(20, init=init, n_init=1, algorithm='lloyd', max_iter=3, tol=0.0).fit(x)
    assert (ours.iterations, ours.converged) == (3, False)
    assert relative(ours.inertia, theirs.inertia_) < 1e-4
    np.testing.assert_array_equal(kmeans.assign(x, ours.centroids)[0], theirs.labels_)
    # Without the final assignment: the same centroids, with the third assignment's inertia.
    lean = kmeans.fit(x, options(20, max_iters=3, tol=0.0, final_assignment=False),
                      init_centroids=init)
    np.testing.assert_array_equal(lean.centroids, ours.centroids)
    two_updates = KMeans(20, init=init, n_init=1, algorithm='lloyd', max_iter=2, tol=0.0).fit(x)
    third_assignment = kmeans.assign(x, two_updates.cluster_centers_)
    assert relative(lean.inertia, float(third_assignment[1].sum())) < 1e-4
    assert lean.inertia > ours.inertia


@pytest.mark.parametrize('init', ['k-means++', 'k-means||', 'random'])
def test_sharded_fit_equals_one_device_fit(init):
    x, _ = blobs(1001, 6, 9, seed=5, spread=1.5, separation=3.0)  # 1001 rows: 8 devices pad
    fits = [kmeans.fit(x, options(9, init=init, seed=7), mesh=mesh)
            for mesh in (one_device_mesh(), sharding.make_mesh(), sharding.make_mesh(fsdp=2))]
    for other in fits[1:]:
        np.testing.assert_allclose(other.centroids, fits[0].centroids, rtol=1e-5, atol=1e-5)
        assert relative(other.inertia, fits[0].inertia) < 1e-5
        assert other.iterations == fits[0].iterations
        np.testing.assert_array_equal(other.counts, fits[0].counts)
    assert fits[0].counts.sum() == 1001


def test_bfloat16_3x_products_are_float32_to_about_1e5():
    """The split products (high.high + high.low + low.high) against float64, next to float32's:
    the assignment scores come out within ~1e-5 of |x||c|, and the nearest centroid is the
    same as float32's on rows without a near tie."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 384)).astype(np.float32)
    c = rng.normal(size=(50, 384)).astype(np.float32)
    mesh = one_device_mesh()
    split_rows = kmeans_matmul.split_rows_fn(mesh)(jax.device_put(x))
    products = jax.lax.dot_general(
        kmeans_matmul.matmul_lhs(jax.numpy.asarray(c), split=True),
        jax.lax.bitcast_convert_type(split_rows, jax.numpy.bfloat16), (((1,), (1,)), ((), ())),
        preferred_element_type=jax.numpy.float32)
    exact = c.astype(np.float64) @ x.T.astype(np.float64)
    scale = np.linalg.norm(c, axis=1)[:, None] * np.linalg.norm(x, axis=1)[None, :]
    error = np.abs(np.asarray(products) - exact) / scale
    assert error.max() < 2e-5
    assert error.max() > 1e-8, 'the products ran in float32, not as three bfloat16 products'
    ours = kmeans.assign(x, c, matmul_precision='bfloat16_3x', mesh=mesh)
    np.testing.assert_array_equal(ours[0], brute_force_nearest(x, c)[0])


@pytest.mark.parametrize('matmul_precision', ['bfloat16_3x', 'auto'])
def test_split_products_shard_and_stream_like_float32(matmul_precision):
    x, _ = blobs(1001, 24, 9, seed=5, spread=1.5, separation=3.0)
    reference = kmeans.fit(x, options(9, seed=7), mesh=one_device_mesh())
    for mesh in (one_device_mesh(), sharding.make_mesh()):
        fit = kmeans.fit(x, options(9, seed=7, init='k-means||',
                                    matmul_precision=matmul_precision), mesh=mesh)
        seeded_alike = kmeans.fit(x, options(9, seed=7, matmul_precision=matmul_precision),
                                  mesh=mesh)
        np.testing.assert_allclose(seeded_alike.centroids, reference.centroids, atol=1e-4)
        np.testing.assert_array_equal(seeded_alike.counts, reference.counts)
        assert relative(fit.inertia, reference.inertia) < 1e-3
    ids, distances = kmeans.assign(x, reference.centroids, matmul_precision=matmul_precision,
                                   batch_rows=333)
    np.testing.assert_array_equal(ids, brute_force_nearest(x, reference.centroids)[0])
    np.testing.assert_allclose(distances, brute_force_nearest(x, reference.centroids)[1],
                               rtol=1e-4, atol=1e-3)
    mini = kmeans.fit_minibatch(np.array_split(x, 4), options(
        9, seed=7, matmul_precision=matmul_precision), epochs=2)
    assert mini.counts.sum() == 1001


def test_auto_precision_is_bfloat16_3x_only_where_bfloat16_runs_in_hardware(monkeypatch):
    mesh = one_device_mesh()
    monkeypatch.setattr(precision, 'cpu_flags', lambda: frozenset({'avx512f', 'amx_bf16'}))
    assert kmeans.resolve_matmul_precision('auto', mesh) == 'bfloat16_3x'
    monkeypatch.setattr(precision, 'cpu_flags', lambda: frozenset({'avx2', 'fma'}))
    assert kmeans.resolve_matmul_precision('auto', mesh) == 'float32'
    assert kmeans.resolve_matmul_precision('bfloat16_3x', mesh) == 'bfloat16_3x'


def test_same_seed_same_result_and_seeds_differ():
    x, _ = blobs(800, 4, 15, seed=2, spread=2.0, separation=2.0)
    first, again, other = (kmeans.fit(x, options(15, seed=seed, max_iters=2))
                           for seed in (3, 3, 4))
    np.testing.assert_array_equal(first.centroids, again.centroids)
    assert first.inertia == again.inertia
    assert not np.allclose(first.centroids, other.centroids)


def spherical_reference(x, init, max_iters, tol):
    """Spherical k-means in float64 numpy, stopping by scikit-learn's rules."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    centroids = init / np.linalg.norm(init, axis=1, keepdims=True)
    tol = tol * np.mean(np.var(x, axis=0))
    previous = np.full(len(x), -1)
    iterations = 0
    for _ in range(max_iters):
        iterations += 1
        labels = np.argmax(x @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, x)
        updated = centroids.copy()
        filled = np.linalg.norm(sums, axis=1) > 0
        updated[filled] = sums[filled] / np.linalg.norm(sums[filled], axis=1, keepdims=True)
        shift = np.sum((updated - centroids) ** 2)
        centroids = updated
        if np.array_equal(labels, previous) or shift <= tol:
            break
        previous = labels
    labels = np.argmax(x @ centroids.T, axis=1)
    inertia = np.sum(1 - np.max(x @ centroids.T, axis=1))
    return centroids, labels, inertia, iterations


def test_cosine_matches_numpy_spherical_reference():
    x, _ = blobs(900, 12, 8, seed=11, spread=1.5, separation=2.0)
    init = x[np.random.default_rng(0).choice(900, 8, replace=False)]
    ours = kmeans.fit(x, options(8, metric='cosine', tol=1e-6), init_centroids=init)
    centroids, labels, inertia, iterations = spherical_reference(x.astype(np.float64), init,
                                                                 100, 1e-6)
    ids, distances = kmeans.assign(x, ours.centroids, metric='cosine')
    np.testing.assert_array_equal(ids, labels)
    assert relative(ours.inertia, inertia) < 1e-4
    assert relative(float(distances.sum()), inertia) < 1e-4
    assert ours.iterations == iterations
    np.testing.assert_allclose(np.linalg.norm(ours.centroids, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours.centroids, centroids, atol=1e-5)


def test_an_empty_cluster_is_reseeded_like_sklearn():
    x, _ = blobs(600, 3, 4, seed=4, separation=6.0)
    init = x[[0, 0, 1, 2]]  # the duplicate centroid 1 never wins a row
    ours = kmeans.fit(x, options(4, tol=0.0), init_centroids=init)
    theirs = KMeans(4, init=init, n_init=1, algorithm='lloyd', tol=0.0).fit(x)
    assert (ours.counts > 0).all()
    np.testing.assert_array_equal(kmeans.assign(x, ours.centroids)[0], theirs.labels_)
    assert relative(ours.inertia, theirs.inertia_) < 1e-4


def test_several_empty_clusters_all_get_rows():
    x, _ = blobs(700, 5, 6, seed=8, separation=5.0)
    far_away = np.full((3, 5), 1e3, np.float32)  # three centroids no row is near
    init = np.concatenate([x[:3], far_away])
    for mesh in (one_device_mesh(), sharding.make_mesh()):
        result = kmeans.fit(x, options(6), mesh=mesh, init_centroids=init)
        assert (result.counts > 0).all()
        assert np.abs(result.centroids).max() < 100  # none left far away
        assert len(np.unique(result.centroids.round(4), axis=0)) == 6


def brute_force_nearest(x, centroids):
    distances = ((x[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    return distances.argmin(1), distances.min(1)


def test_streaming_assign_equals_one_shot_and_brute_force():
    x, _ = blobs(2500, 7, 10, seed=6, spread=2.0, separation=3.0)
    centroids = x[:10] + 0.1
    one_shot = kmeans.assign(x, centroids)
    streamed = kmeans.assign((x[start:start + size] for start, size in
                              zip([0, 1, 301, 1801], [1, 300, 1500, 699], strict=True)),
                             centroids)
    small_batches = kmeans.assign(x, centroids, batch_rows=333, chunk_rows=64)
    for ids, distances in (streamed, small_batches):
        np.testing.assert_array_equal(ids, one_shot[0])
        np.testing.assert_allclose(distances, one_shot[1], rtol=1e-5, atol=1e-5)
    ids, distances = brute_force_nearest(x, centroids)
    np.testing.assert_array_equal(one_shot[0], ids)
    np.testing.assert_allclose(one_shot[1], distances, rtol=1e-4, atol=1e-4)
    assert one_shot[0].dtype == np.int32 and one_shot[1].dtype == np.float32


def test_float16_input_clusters_like_float32():
    x, _ = blobs(1000, 16, 5, seed=9, separation=5.0)
    x16 = x.astype(np.float16)
    init = x16[:5]
    half = kmeans.fit(x16, options(5), init_centroids=init)
    full = kmeans.fit(x16.astype(np.float32), options(5), init_centroids=init)
    np.testing.assert_allclose(half.centroids, full.centroids, atol=1e-5)
    np.testing.assert_array_equal(kmeans.assign(x16, half.centroids)[0],
                                  kmeans.assign(x16.astype(np.float32), full.centroids)[0])


def test_minibatch_reaches_the_inertia_of_full_lloyd():
    x, _ = blobs(6000, 8, 12, seed=12, spread=1.0, separation=4.0)
    batches = np.array_split(x, 12)
    full = kmeans.fit(x, options(12))
    mini = kmeans.fit_minibatch(lambda: iter(batches), options(12), epochs=5)
    assert relative(mini.inertia, full.inertia) < 0.03
    assert mini.counts.sum() == 6000 and (mini.counts > 0).all()
    assert 0 < mini.iterations <= 5 * 12
    ids, distances = kmeans.assign(x, mini.centroids)
    assert relative(float(distances.sum()), mini.inertia) < 1e-5
    cosine = kmeans.fit_minibatch(batches, options(12, metric='cosine'), epochs=3)
    np.testing.assert_allclose(np.linalg.norm(cosine.centroids, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize('init', ['k-means++', 'k-means||'])
def test_careful_seeding_finds_every_separated_blob_where_random_seeding_does_not(init):
    x, centres = blobs(2000, 4, 10, seed=13, spread=0.3, separation=10.0)

    def blobs_found(init_name: str, seed: int) -> int:
        result = kmeans.fit(x, options(10, init=init_name, seed=seed, max_iters=1))
        nearest = np.linalg.norm(centres[:, None] - result.centroids[None], axis=-1).min(1)
        return int((nearest < 1.0).sum())

    assert [blobs_found(init, seed) for seed in range(4)] == [10] * 4
    assert min(blobs_found('random', seed) for seed in range(4)) < 10


def raises(match: str):
    return pytest.raises(InputError, match=match)


def test_bad_input_is_named_before_any_jax_work():
    x, _ = blobs(40, 3, 2)
    with raises(r'k=50 is larger than the 40 rows'):
        kmeans.fit(x, options(50))
    with raises(r'k must be an integer >= 1, got 0'):
        options(0)
    with raises(r'no rows to cluster \(empty input\)'):
        kmeans.fit(np.zeros((0, 3), np.float32), options(2))
    with raises(r'expected a 2-D array \(rows, features\), got shape \(40,\)'):
        kmeans.fit(x[:, 0], options(2))
    bad = x.copy()
    bad[[17, 21], 1] = np.nan
    bad[30, 0] = np.inf
    with raises(r'k-means: 3 rows contain NaN or Inf \(first at row 17\)'):
        kmeans.fit(bad, options(2))
    zero = x.copy()
    zero[[4, 9]] = 0
    with raises(r'\(cosine\): 2 rows have zero norm \(first at row 4\)'):
        kmeans.fit(zero, options(2, metric='cosine'))
    kmeans.fit(zero, options(2, max_iters=1))  # zero rows are fine for euclidean
    with raises(r"metric must be one of \('euclidean', 'cosine'\), got 'manhattan'"):
        options(2, metric='manhattan')
    with raises(r'init_centroids has shape \(3, 3\), expected \(k=2, 3\)'):
        kmeans.fit(x, options(2), init_centroids=x[:3])
    with raises(r"matmul_precision must be one of \('float32', 'bfloat16_3x', 'auto'\), "
                r"got 'bfloat16'"):
        options(2, matmul_precision='bfloat16')
    with raises(r"assign: matmul_precision must be one of .* got 'half'"):
        kmeans.assign(x, x[:2], matmul_precision='half')


def test_bad_batches_are_named_with_their_global_row():
    x, _ = blobs(100, 3, 2)
    bad = x.copy()
    bad[75] = np.nan
    with raises(r'k-means assign: 1 row contains NaN or Inf \(first at row 75\)'):
        kmeans.assign([bad[:50], bad[50:]], x[:2])
    with raises(r'k-means assign: rows have 2 features, expected 3'):
        kmeans.assign(x[:, :2], x[:2])
    with raises(r'one-shot iterator'):
        kmeans.fit_minibatch(iter([x]), options(2))
    with raises(r'mini-batch: 1 row contains NaN or Inf \(first at row 75\)'):
        kmeans.fit_minibatch([bad[:50], bad[50:]], options(2))
    with raises(r'k=200 is larger than the 100 rows'):
        kmeans.fit_minibatch([x[:50], x[50:]], options(200))


def test_assign_of_nothing_is_empty():
    ids, distances = kmeans.assign(np.zeros((0, 3), np.float32), np.eye(3, dtype=np.float32))
    assert ids.shape == distances.shape == (0,)


def test_cosine_rows_of_extreme_norm_cluster_by_their_direction():
    """Rows at 1e-20 (float32 squares underflow), 1e-42 (subnormal values) or 1e25 (squares
    overflow) have a direction like any other: they cluster as if they were unit rows."""
    x, _ = blobs(400, 6, 4, seed=31, separation=5.0)
    hostile = x.copy()
    hostile[:100] *= np.float32(1e-20)
    hostile[100:110] = (x[100:110].astype(np.float64) * 1e-42).astype(np.float32)
    hostile[110:150] *= np.float32(1e25)
    kept = hostile.copy()
    ours = kmeans.fit(hostile, options(4, metric='cosine', seed=2))
    reference = kmeans.fit(x, options(4, metric='cosine', seed=2))
    np.testing.assert_array_equal(hostile, kept)  # the caller's rows are left as they were
    assert np.isfinite(ours.centroids).all() and ours.empty_clusters == 0
    np.testing.assert_allclose(ours.centroids, reference.centroids, atol=1e-3)
    # The subnormal rows keep ~3 digits of their direction; the others all of it.
    ids, distances = kmeans.assign(hostile, ours.centroids, metric='cosine')
    reference_ids, reference_distances = kmeans.assign(x, ours.centroids, metric='cosine')
    np.testing.assert_array_equal(ids, reference_ids)
    np.testing.assert_allclose(distances, reference_distances, atol=1e-3)
    np.testing.assert_array_equal(ours.counts, np.bincount(ids, minlength=4))
    mini = kmeans.fit_minibatch(np.array_split(hostile, 4), options(4, metric='cosine'))
    assert np.isfinite(mini.centroids).all() and mini.counts.sum() == 400


def test_ordinary_rows_pass_the_checks_untouched():
    x, _ = blobs(300, 8, 3, seed=32)
    for scale in (1e-9, 1.0, 1e9):
        rows = x * np.float32(scale)
        for metric in kmeans.METRICS:
            assert kmeans_checks.checked_rows(rows, metric, 'k-means') is rows


def test_euclidean_rows_beyond_float32_arithmetic_are_named():
    x, _ = blobs(200, 4, 3, seed=33)
    huge = x.copy()
    huge[[40, 90]] *= np.float32(1e19)  # squared norms ~1e38 and more: distances overflow
    with raises(r'k-means \(euclidean\): 2 rows have a squared norm too large for float32 '
                r'arithmetic \(first at row 40: .*\); .* scale the rows down'):
        kmeans.fit(huge, options(3))
    with raises(r'k-means assign \(euclidean\): 1 row has a squared norm too large .*'
                r'first at row 90'):
        kmeans.assign([x[:50], huge[50:]], x[:3])  # row 90 is the second batch's 40th
    with raises(r'mini-batch \(euclidean\): 2 rows have a squared norm too large'):
        kmeans.fit_minibatch(huge, options(3))
    # Each row within the limit, but their squared distances to the mean sum past float32's.
    directions = np.random.default_rng(0).normal(size=(1000, 4))
    far = (4e18 * directions / np.linalg.norm(directions, axis=1, keepdims=True))
    with raises(r"squared distances to their mean sum beyond float32's range"):
        kmeans.fit(far.astype(np.float32), options(3))
    # Rows so small that their squared distances underflow would all look alike.
    with raises(r'k-means \(euclidean\): every value of the rows is below 2\^-40 .* '
                r'\(the largest is .*e-2\d\).*scale the rows up'):
        kmeans.fit(x * np.float32(1e-25), options(3))
    kmeans.fit(np.zeros((10, 4), np.float32), options(1))  # all-zero rows are merely alike


def test_more_clusters_than_distinct_rows_is_reported(caplog):
    x, _ = blobs(60, 5, 3, seed=34)
    three_values = np.repeat(x[:3], 20, axis=0)
    with caplog.at_level(logging.WARNING, logger='vise_jax.cluster.kmeans'):
        for init in ('k-means++', 'random'):  # k-means|| ends in a k-means++ of its own
            result = kmeans.fit(three_values, options(5, init=init))
            assert result.empty_clusters == 2 == np.count_nonzero(result.counts == 0)
        mini = kmeans.fit_minibatch(three_values, options(5), batch_rows=16)
        assert mini.empty_clusters == np.count_nonzero(mini.counts == 0) >= 2
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert 'k-means k=5: 2 cluster(s) ended with no rows' in warnings[0]
    assert 'fewer than k distinct values' in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='vise_jax.cluster.kmeans'):
        clean = kmeans.fit(x, options(3))
    assert clean.empty_clusters == 0 and not caplog.records


PROCESS_SCRIPT = '''
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ['JAX_PLATFORMS'] = 'cpu'
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
process, port, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process)
import numpy as np
from vise_jax.cluster import kmeans
x = np.load(data)
mine = x[:600] if process == 0 else x[600:]
result = kmeans.fit(mine, kmeans.KMeansOptions(k=6, seed=3, progress=False))
ids, distances = kmeans.assign(mine, result.centroids)
np.savez(out, centroids=result.centroids, inertia=result.inertia, counts=result.counts, ids=ids)
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def test_two_processes_cluster_like_one(tmp_path):
    """Each process passes its own rows (600 and 401); the result is the one-process result."""
    x, _ = blobs(1001, 5, 6, seed=21, spread=1.5, separation=4.0)
    np.save(tmp_path / 'x.npy', x)
    script = tmp_path / 'process.py'
    script.write_text(PROCESS_SCRIPT)
    port = str(free_port())
    env = {key: value for key, value in os.environ.items() if key != 'XLA_FLAGS'}
    processes = [subprocess.Popen([sys.executable, str(script), str(rank), port,
                                   str(tmp_path / 'x.npy'), str(tmp_path / f'out{rank}.npz')],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for rank in (0, 1)]
    outputs = [process.communicate(timeout=120)[0].decode() for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    parts = [np.load(tmp_path / f'out{rank}.npz') for rank in (0, 1)]
    alone = kmeans.fit(x, options(6, seed=3))
    for part in parts:
        np.testing.assert_allclose(part['centroids'], alone.centroids, rtol=1e-5, atol=1e-5)
        assert relative(float(part['inertia']), alone.inertia) < 1e-5
        np.testing.assert_array_equal(part['counts'], alone.counts)
    np.testing.assert_array_equal(np.concatenate([part['ids'] for part in parts]),
                                  kmeans.assign(x, alone.centroids)[0])
