"""Pseudo-label assembly, the label store round trip, reaction features and the report."""

import numpy as np
import pytest

from vise_jax import artifacts
from vise_jax.cluster import labels, report
from vise_jax.errors import InputError


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
