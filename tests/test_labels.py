"""Pseudo-label assembly, the label store round trip, reaction features and the report."""

import pickle

import numpy as np
import pytest

from vise_jax import artifacts, posts
from vise_jax.cluster import clustering, kmeans, labels, report
from vise_jax.errors import InputError
from vise_jax.inputs import targets
from vise_jax.posts import store as store_lib
from vise_jax.text import embed


def test_comment_head_groups_by_post_and_masks_posts_without_comments():
    # Comments of posts 2, 0, 2, 3 (post 1 has none), in store order.
    head = labels.comment_head(k=4, num_posts=4, post_index=np.array([0, 2, 2, 3]),
                               cluster_ids=np.array([1, 3, 3, 0]))
    assert head.name == 'comments_k4' and head.num_posts == 4
    np.testing.assert_array_equal(head.mask(), [True, False, True, True])
    np.testing.assert_array_equal(head.post_cluster_ids(2), [3, 3])
    targets = head.soft_targets([0, 1, 2])
    np.testing.assert_allclose(targets, [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])


def test_soft_target_is_the_histogram_of_the_multiset():
    head = labels.comment_head(k=3, num_posts=1, post_index=np.zeros(4, int),
                               cluster_ids=np.array([2, 0, 2, 2]))
    np.testing.assert_allclose(head.soft_targets([0]), [[0.25, 0, 0.75]])


def test_reaction_head_and_features():
    counts = np.array([[3, 1, 0], [0, 0, 0], [0, 10, 10]])
    features, has_signal = labels.reaction_features(counts, log_total=True)
    np.testing.assert_array_equal(has_signal, [True, False, True])
    np.testing.assert_allclose(features[0, :3], [0.75, 0.25, 0])
    np.testing.assert_allclose(features[:, 3], np.log1p([4, 0, 20]) / np.log1p(20), rtol=1e-6)
    assert labels.reaction_features(counts, log_total=False)[0].shape == (3, 3)
    head = labels.reaction_head(k=2, has_signal=has_signal, cluster_ids=np.array([1, 0]))
    np.testing.assert_array_equal(head.ids, [1, -1, 0])
    np.testing.assert_allclose(head.soft_targets([0, 1, 2]), [[0, 1], [0, 0], [1, 0]])


def test_label_store_round_trip_and_alignment(tmp_path):
    comments = labels.comment_head(2, 3, np.array([0, 0, 2]), np.array([1, 0, 1]))
    reactions = labels.reaction_head(5, np.array([True, True, False]), np.array([4, 2]))
    for head in (comments, reactions):
        labels.save_head(tmp_path, head)
    post_ids = ['a', 'b', 'c']
    labels.write_index(tmp_path, 3, labels.post_ids_digest(post_ids), {
        comments.name: {'kind': 'comments', 'k': 2}, reactions.name: {'kind': 'reactions', 'k': 5}})
    with pytest.raises(InputError, match='no finished labels'):
        labels.LabelStore(tmp_path)
    artifacts.StageDir(tmp_path, 'cluster', {}).finish({}, {})

    store = labels.LabelStore(tmp_path)
    assert store.head_names == ['comments_k2', 'reactions_k5'] and store.num_posts == 3
    loaded = store.head('comments_k2')
    np.testing.assert_array_equal(loaded.offsets, comments.offsets)
    np.testing.assert_array_equal(loaded.ids, comments.ids)
    np.testing.assert_array_equal(store.head('reactions_k5').ids, [4, 2, -1])
    store.check_aligned(post_ids)
    with pytest.raises(InputError, match='other posts'):
        store.check_aligned(['a', 'c', 'b'])
    with pytest.raises(InputError, match="no head 'comments_k9'"):
        store.head('comments_k9')


def test_nearest_members_and_agreement():
    ids = np.array([1, 0, 1, 1, 0])
    distances = np.array([0.5, 0.2, 0.1, 0.9, 0.3])
    members = report.nearest_members(ids, distances, k=3, per_cluster=2)
    assert [m.tolist() for m in members] == [[1, 4], [2, 0], []]
    perfect = report.agreement(np.array([0, 0, 1, 1]), np.array([5, 5, 7, 7]))
    assert perfect == {'nmi': pytest.approx(1.0), 'purity': 1.0}
    assert report.agreement(np.array([0, 1, 0, 1]), np.array([5, 5, 7, 7]))['purity'] == 0.5


def test_report_writes_markdown_and_plots(tmp_path):
    heads = [
        report.HeadSummary('comments_k2', 'comments', 2, np.array([3, 1]),
                           nearest_texts=[['so | happy', 'yay'], ['sad']],
                           agreement={'mood': {'nmi': 0.5, 'purity': 0.75}}),
        report.HeadSummary('reactions_k2', 'reactions', 2, np.array([2, 2]),
                           mean_profiles=np.array([[0.5, 0.5], [0.1, 0.9]])),
    ]
    summary = report.write_report(tmp_path, heads, ['like', 'sad'])
    text = (tmp_path / 'report' / 'report.md').read_text()
    assert 'so \\| happy<br>yay' in text and 'NMI 0.500' in text and '| 90% |' in text
    for png in ('sizes_comments_k2.png', 'sizes_reactions_k2.png', 'profiles_reactions_k2.png'):
        assert (tmp_path / 'report' / png).read_bytes()[:4] == b'\x89PNG'
    assert summary['comments_k2']['largest_share'] == 0.75


# --- The label store on disk: memory-mapped, written shard by shard ------------------------------


def random_comment_labels(num_posts, k, seed):
    """Per-comment (post_index, cluster id) in store order, with posts of 0-6 comments."""
    rng = np.random.default_rng(seed)
    per_post = rng.integers(0, 7, num_posts) * (rng.random(num_posts) < 0.8)
    post_index = np.repeat(np.arange(num_posts), per_post)
    return post_index, rng.integers(0, k, len(post_index)).astype(np.int32)


def finished_label_store(directory, heads, num_posts):
    for head in heads:
        labels.save_head(directory, head)
    digest = labels.post_ids_digest(str(i) for i in range(num_posts))
    labels.write_index(directory, num_posts, digest,
                       {h.name: {'kind': h.kind, 'k': h.k} for h in heads})
    artifacts.StageDir(directory, 'cluster', {}).finish({}, {})
    return labels.LabelStore(directory)


def test_label_store_is_memory_mapped_and_gives_the_same_targets(tmp_path):
    post_index, ids = random_comment_labels(num_posts=300, k=6, seed=0)
    comments = labels.comment_head(6, 300, post_index, ids)
    has_signal = np.arange(300) % 3 > 0
    reactions = labels.reaction_head(4, has_signal, np.arange(has_signal.sum()) % 4)
    store = finished_label_store(tmp_path, [comments, reactions], 300)
    assert (tmp_path / 'comments_k6' / labels.OFFSETS_FILE).exists()
    assert not list(tmp_path.glob('*.npz'))
    for name, head in (('comments_k6', comments), ('reactions_k4', reactions)):
        loaded = store.head(name)
        assert isinstance(loaded.ids, np.memmap) and loaded.ids.dtype == np.int32
        np.testing.assert_array_equal(loaded.ids, head.ids)
    loaded = store.head('comments_k6')
    assert isinstance(loaded.offsets, np.memmap) and loaded.offsets.dtype == np.int64
    np.testing.assert_array_equal(loaded.offsets, comments.offsets)

    # The input pipeline's targets from the memory-mapped store equal those of the arrays in memory.
    specs = targets.head_specs(store, (), max_targets=3)
    post_targets = pickle.loads(pickle.dumps(targets.PostTargets(tmp_path, specs)))
    batch = np.array([0, 5, 299, -1, 17, 3, 3, 150])
    got = post_targets(batch)['targets']
    expected = {
        'comments_k6': targets.comment_targets(np.asarray(comments.offsets),
                                               np.asarray(comments.ids), 6, batch, 3),
        'reactions_k4': targets.reaction_targets(np.asarray(reactions.ids), batch)}
    for name, (ids_expected, probs_expected) in expected.items():
        np.testing.assert_array_equal(got[name]['ids'], ids_expected)
        np.testing.assert_array_equal(got[name]['probs'], probs_expected)
        assert type(got[name]['ids']) is np.ndarray
    np.testing.assert_allclose(got['comments_k6']['probs'].sum(axis=1),
                               [float(comments.mask()[p]) if p >= 0 else 0 for p in batch],
                               rtol=1e-6)


def test_labels_of_an_older_version_are_refused(tmp_path):
    store = finished_label_store(tmp_path, [labels.reaction_head(2, np.ones(3, bool),
                                                                 np.array([0, 1, 0]))], 3)
    assert store.num_posts == 3
    index = artifacts.read_json(tmp_path / labels.LABELS_INDEX)
    artifacts.atomic_write_json(tmp_path / labels.LABELS_INDEX, {**index, 'version': 1})
    with pytest.raises(InputError, match='rerun the cluster stage'):
        labels.LabelStore(tmp_path)


def test_the_streaming_writer_writes_what_comment_head_saves(tmp_path):
    post_index, ids = random_comment_labels(num_posts=200, k=5, seed=1)
    labels.save_head(tmp_path / 'whole', labels.comment_head(5, 200, post_index, ids))
    # Batches of rows that split posts, an empty batch, trailing posts without comments.
    cuts = [0, 1, 1, 40, 41, 41, 200, 333, len(ids)]
    with labels.CommentLabelsWriter(tmp_path / 'streamed', 5, 200, len(ids)) as writer:
        for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
            writer.add(post_index[start:stop], ids[start:stop])
    for name in (labels.OFFSETS_FILE, labels.IDS_FILE):
        whole = np.load(tmp_path / 'whole' / 'comments_k5' / name)
        streamed = np.load(tmp_path / 'streamed' / 'comments_k5' / name)
        assert streamed.dtype == whole.dtype
        np.testing.assert_array_equal(streamed, whole)

    with (pytest.raises(InputError, match='not in post order'),
          labels.CommentLabelsWriter(tmp_path / 'bad', 5, 200, 4) as writer):
        writer.add(np.array([3, 4]), np.array([0, 1]))
        writer.add(np.array([2, 5]), np.array([0, 1]))
    with (pytest.raises(RuntimeError, match='announced'),
          labels.CommentLabelsWriter(tmp_path / 'short', 5, 200, 4) as writer):
        writer.add(np.array([3, 4]), np.array([0, 1]))
    # Nothing of a failed writer is left behind.
    assert not [p for p in tmp_path.rglob('*') if p.is_file() and 'whole' not in p.parts
                and 'streamed' not in p.parts]


def test_batched_report_figures_equal_those_over_all_rows():
    rng = np.random.default_rng(2)
    ids, truth = rng.integers(0, 6, 500), rng.integers(0, 3, 500)
    distances = rng.integers(0, 20, 500).astype(np.float32)   # many ties
    nearest = report.NearestMembers(6, 4, payload_width=1)
    counts = np.zeros((3, 6), np.int64)
    for start in range(0, 500, 37):
        rows = slice(start, start + 37)
        nearest.add(ids[rows], distances[rows], np.arange(500)[rows, None])
        counts += report.contingency(ids[rows], truth[rows], 3, 6)
    assert ([m[:, 0].tolist() for m in nearest.members()]
            == [m.tolist() for m in report.nearest_members(ids, distances, 6, 4)])
    assert report.agreement_from_contingency(counts) == report.agreement(ids, truth)


# --- The cluster stage's comment heads: one pass over the embeddings for every K ----------------


def write_world(directory, num_posts=60, dim=8, seed=3, rows_per_chunk=23, reactions=True):
    """A posts store (metadata only) and comment embeddings chunked by comment count, so that
    some posts continue from one shard into the next; `reactions=False`: none on any post."""
    rng = np.random.default_rng(seed)
    info = posts.ImageInfo('JPEG', 8, 8, 'RGB')
    store_posts = []
    for i in range(num_posts):
        comments = tuple(f'post {i} comment {c}' for c in range(rng.integers(0, 5)))
        counts = dict.fromkeys(posts.REACTION_TYPES, 0)
        like, sad = int(rng.integers(0, 4)), int(rng.integers(0, 3))
        if reactions:
            counts['like'], counts['sad'] = like, sad
        store_posts.append(posts.Post(f'p{i}', comments, counts, info, f'x:{i}', image=b'x'))
    store_dir = directory / 'posts'
    store_lib.write_shard(store_dir, 0, store_posts[:25], posts.REACTION_TYPES)
    store_lib.write_shard(store_dir, 1, store_posts[25:], posts.REACTION_TYPES)
    store_lib.write_index(store_dir, {0: 25, 1: num_posts - 25}, posts.REACTION_TYPES, extra={})
    artifacts.StageDir(store_dir, 'ingest', {}).finish({}, {})
    rows = list(embed.iter_comments(store_posts))
    centres = rng.normal(size=(4, dim))
    vectors = centres[rng.integers(0, 4, len(rows))] + 0.3 * rng.normal(size=(len(rows), dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    out = directory / 'embeddings'
    out.mkdir()
    starts = list(range(0, len(rows), rows_per_chunk))
    for number, start in enumerate(starts):
        chunk = rows[start:start + rows_per_chunk]
        embed.write_chunk(out, number, vectors[start:start + len(chunk)], chunk,
                          record={'posts': [chunk[0][0], chunk[-1][0] + 1]})
    embed.write_index(out, len(starts), {'encoder': {'dim': dim, 'name': 'test'},
                                         'chunk_size': rows_per_chunk, 'chunks': 'comments'})
    latents = directory / 'latents.csv'
    latents.write_text('id,mood\n' + ''.join(f'p{i},{"ab"[i % 2]}\n' for i in range(num_posts)))
    return posts.PostsStore(store_dir), embed.EmbeddingShards(out), latents


def test_comment_heads_are_assigned_in_one_pass_over_the_embeddings(tmp_path, monkeypatch):
    store, shards, latents = write_world(tmp_path)
    assert shards.num_shards >= 4
    settings = clustering.ClusterSettings(
        comment_ks=(2, 3, 5), reaction_ks=(2,), fit_sample=50, init='k-means++', max_iters=20,
        tol=1e-4, reaction_log_total=True, nearest_per_cluster=3, latents=str(latents), seed=0)
    reads = []
    real_shard = embed.EmbeddingShards.shard

    def counting_shard(self, number):
        reads.append(number)
        return real_shard(self, number)

    monkeypatch.setattr(embed.EmbeddingShards, 'shard', counting_shard)
    sampled = set(np.searchsorted(shards.shard_starts, shards.sample_rows(50, seed=0),
                                  side='right') - 1)
    out = tmp_path / 'labels'
    out.mkdir()
    clustering.make_labels(store, shards, out, settings)
    artifacts.StageDir(out, 'cluster', {}).finish({}, {})
    # The sample reads the shards it draws from once; the assignment reads every shard once,
    # whatever the number of Ks.
    expected = sorted(list(range(shards.num_shards)) + sorted(int(s) for s in sampled))
    assert sorted(reads) == expected

    # Labels, sizes, nearest comments and agreement equal the per-K computation over all rows.
    label_store = labels.LabelStore(out)
    every = np.concatenate([np.asarray(e, np.float32) for e, _, _ in shards])
    post_index, comment_number = shards.post_index(), shards.comment_number()
    texts = {p: m.comments for p, m in enumerate(store.iter_meta())}
    summary = artifacts.read_json(out / 'report' / 'report.json')
    for k in settings.comment_ks:
        name = f'comments_k{k}'
        centroids = np.load(out / 'centroids' / f'{name}.npy')
        ids, distances = kmeans.assign([e for e, _, _ in shards], centroids, metric='cosine')
        whole = labels.comment_head(k, len(store), post_index, ids)
        head = label_store.head(name)
        assert isinstance(head.ids, np.memmap)
        np.testing.assert_array_equal(head.ids, whole.ids)
        np.testing.assert_array_equal(head.offsets, whole.offsets)
        record = artifacts.read_json(out / 'heads' / f'{name}.json')['summary']
        assert record['sizes'] == np.bincount(ids, minlength=k).tolist()
        nearest = [[texts[post_index[j]][comment_number[j]] for j in members]
                   for members in report.nearest_members(ids, distances, k, 3)]
        assert record['nearest_texts'] == nearest
        mood = np.arange(len(store))[post_index] % 2
        assert summary[name]['agreement']['mood'] == pytest.approx(report.agreement(ids, mood))
        assert every.shape[0] == len(ids)
    assert label_store.head_names == ['comments_k2', 'comments_k3', 'comments_k5', 'reactions_k2']


@pytest.mark.parametrize('fit_sample', [1000, 25])
def test_reaction_heads_are_assigned_in_a_streamed_pass_over_the_store(tmp_path, monkeypatch,
                                                                        fit_sample):
    """Reaction heads read the store a batch of posts at a time (7 here): labels, sizes, mean
    profiles, example posts and agreement equal the computation over every post at once, k-means
    fitted on every post with reactions or on a seeded sample of fit_sample of them."""
    monkeypatch.setattr(clustering, '_POSTS_PER_BATCH', 7)
    store, shards, latents = write_world(tmp_path)
    settings = clustering.ClusterSettings(
        comment_ks=(), reaction_ks=(2, 3), fit_sample=fit_sample, init='k-means++',
        max_iters=20, tol=1e-4, reaction_log_total=True, nearest_per_cluster=3,
        latents=str(latents), seed=0)
    out = tmp_path / 'labels'
    out.mkdir()
    clustering.make_labels(store, shards, out, settings)
    artifacts.StageDir(out, 'cluster', {}).finish({}, {})

    counts = np.array([[p.reactions[t] for t in store.reaction_types] for p in store.iter_meta()])
    features, has_signal = labels.reaction_features(counts, log_total=True)
    rows = features[has_signal]
    assert 25 < len(rows) < len(store)
    sample = rows if fit_sample >= len(rows) else rows[np.sort(
        np.random.default_rng(0).choice(len(rows), fit_sample, replace=False))]
    label_store = labels.LabelStore(out)
    summary = artifacts.read_json(out / 'report' / 'report.json')
    for k in settings.reaction_ks:
        name = f'reactions_k{k}'
        centroids = kmeans.fit(sample, settings.kmeans_options(k, 'euclidean')).centroids
        np.testing.assert_array_equal(np.load(out / 'centroids' / f'{name}.npy'), centroids)
        ids, distances = kmeans.assign(rows, centroids)
        np.testing.assert_array_equal(label_store.head(name).ids,
                                      labels.reaction_head(k, has_signal, ids).ids)
        record = artifacts.read_json(out / 'heads' / f'{name}.json')['summary']
        assert record['sizes'] == np.bincount(ids, minlength=k).tolist()
        profiles = np.zeros((k, len(store.reaction_types)), np.float32)
        np.add.at(profiles, ids, rows[:, :len(store.reaction_types)])
        profiles /= np.maximum(np.bincount(ids, minlength=k), 1)[:, None]
        np.testing.assert_allclose(record['mean_profiles'], profiles, rtol=1e-6)
        post_of_row = np.flatnonzero(has_signal)
        assert record['example_posts'] == [
            post_of_row[members].tolist() for members in
            report.nearest_members(ids, distances, k, report.EXAMPLES_PER_CLUSTER)]
        mood = np.arange(len(store))[has_signal] % 2
        assert summary[name]['agreement']['mood'] == pytest.approx(report.agreement(ids, mood))


def test_reaction_heads_without_any_reaction_say_so(tmp_path):
    """No post has a reaction: the stage names the setting to drop, writes no reaction head, and
    the comment heads it finished before stay committed."""
    store, shards, _ = write_world(tmp_path, reactions=False)
    settings = clustering.ClusterSettings(
        comment_ks=(2,), reaction_ks=(3,), fit_sample=50, init='k-means++', max_iters=5,
        tol=1e-4, reaction_log_total=True, nearest_per_cluster=3, latents='', seed=0)
    out = tmp_path / 'labels'
    out.mkdir()
    with pytest.raises(InputError, match=r'no post has reactions; drop cluster.reaction_ks'):
        clustering.make_labels(store, shards, out, settings)
    assert not (out / 'reactions_k3').exists()
    assert (out / 'heads' / 'comments_k2.json').is_file()
