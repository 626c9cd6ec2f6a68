"""The Grain input pipeline end to end on a small posts store and label store.

Images are gradients whose blue channel encodes the post index, so after the eval transform a
batch row's colour names the post it came from and can be checked against 'index' and
'targets'.
"""

import collections
import io
import json
import os
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from grain.python import SharedMemoryArray
from PIL import Image

from vise_jax import artifacts, configlib, posts, sharding
from vise_jax import inputs as input_lib
from vise_jax.cluster import labels
from vise_jax.errors import InputError
from vise_jax.inputs import chain, sources
from vise_jax.posts import store as store_lib

NUM_POSTS = 40
COMMENTS_K, REACTIONS_K = 8, 3


def blue_of(index: int) -> int:
    return 10 + 6 * index


def post_image(index: int, width: int = 48, height: int = 36) -> bytes:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    pixels = np.stack([x, y, np.full_like(x, blue_of(index))], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='JPEG', quality=95)
    return buffer.getvalue()


def comment_clusters(index: int) -> list[int]:
    """Post 5k has no comments; others a multiset with repeats, ties and up to 6 clusters."""
    if index % 5 == 0:
        return []
    pattern = [0, 0, 0, 1, 1, 2, 3, 4, 4, 5]
    return [(index + offset) % COMMENTS_K for offset in pattern[:index % 10 + 1]]


def expected_comment_targets(index: int, slots: int) -> tuple[list[int], list[float]]:
    """The most frequent `slots` clusters (ties: smaller id first), renormalised."""
    counts = collections.Counter(comment_clusters(index))
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:slots]
    total = sum(n for _, n in top)
    padding = slots - len(top)
    return ([c for c, _ in top] + [0] * padding, [n / total for _, n in top] + [0.0] * padding)


def reaction_cluster(index: int) -> int:
    return -1 if index % 4 == 0 else index % REACTIONS_K


def write_labels(directory, post_ids):
    clusters = [comment_clusters(i) for i in range(len(post_ids))]
    comment_head = labels.comment_head(
        COMMENTS_K, len(post_ids),
        np.array([i for i, c in enumerate(clusters) for _ in c], np.int64),
        np.array([x for c in clusters for x in c], np.int32))
    reaction_ids = np.array([reaction_cluster(i) for i in range(len(post_ids))])
    reaction_head = labels.reaction_head(REACTIONS_K, reaction_ids >= 0,
                                         reaction_ids[reaction_ids >= 0])
    for head in (comment_head, reaction_head):
        labels.save_head(directory, head)
    labels.write_index(directory, len(post_ids), labels.post_ids_digest(post_ids), {
        comment_head.name: {'kind': 'comments', 'k': COMMENTS_K},
        reaction_head.name: {'kind': 'reactions', 'k': REACTIONS_K}})
    artifacts.StageDir(directory, 'cluster', {}).finish({}, {})


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp('input_world')
    (root / 'images').mkdir()
    rows = []
    for i in range(NUM_POSTS):
        (root / 'images' / f'{i}.jpg').write_bytes(post_image(i))
        rows.append({'id': f'post{i:03d}', 'image': f'images/{i}.jpg', 'comments': ['hi']})
    manifest = root / 'posts.jsonl'
    manifest.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    work = root / 'work'
    options = posts.IngestOptions(reaction_types=posts.REACTION_TYPES, rows_per_shard=16)
    posts.ingest([manifest], artifacts.StageDir(work / 'posts', 'ingest', {}), options)
    write_labels(work / 'labels', [f'post{i:03d}' for i in range(NUM_POSTS)])
    return work


def small_config(**input_overrides):
    config = configlib.default_config()
    config.input.update(dict(image_size=16, global_batch_size=8, num_workers=0,
                             eval_fraction=0.25, max_targets_per_post=3, prefetch_batches=2))
    config.input.update(input_overrides)
    return config


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
    for a, b in zip(first, second, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_eval_batches_carry_the_right_image_targets_and_padding(workdir):
    data = input_lib.pretrain_data(small_config(), workdir, split='eval',
                                   process_index=0, process_count=1)
    batches = list(data.iterator())
    assert data.heads == {'comments_k8': ('comments', 8, 3), 'reactions_k3': ('reactions', 3, 1)}
    assert len(batches) == data.steps_per_epoch == -(-data.num_examples // 8)
    seen = []
    for batch in batches:
        assert batch['image'].shape == (8, 16, 16, 3) and batch['image'].dtype == np.uint8
        assert batch['targets']['comments_k8']['ids'].shape == (8, 3)
        assert batch['targets']['reactions_k3']['probs'].shape == (8, 1)
        for row, index in enumerate(batch['index'].tolist()):
            if index < 0:  # padding
                assert batch['weight'][row] == 0 and not batch['image'][row].any()
                assert not batch['targets']['comments_k8']['probs'][row].any()
                continue
            seen.append(index)
            assert batch['weight'][row] == 1 and batch['bad_image'][row] == 0
            blue = batch['image'][row, ..., 2].mean()
            assert abs(blue - blue_of(index)) < 3, (index, blue)
            ids, probs = (batch['targets']['comments_k8'][k][row] for k in ('ids', 'probs'))
            expected_ids, expected_probs = expected_comment_targets(index, 3)
            np.testing.assert_array_equal(ids, expected_ids)
            np.testing.assert_allclose(probs, expected_probs, rtol=1e-6)
            assert probs.sum() == pytest.approx(0.0 if index % 5 == 0 else 1.0)
            reaction = batch['targets']['reactions_k3']
            assert reaction['probs'][row, 0] == (reaction_cluster(index) >= 0)
            assert reaction['ids'][row, 0] == max(reaction_cluster(index), 0)
    assert seen == sorted(seen) and len(seen) == data.num_examples  # in order, each once
    assert sum(batch['weight'].sum() for batch in batches) == data.num_examples


def test_train_and_eval_splits_are_disjoint_and_cover_the_posts(workdir):
    config = small_config()
    post_ids = sources.store_post_ids(workdir / 'posts')
    held_out = sources.eval_membership(post_ids, 0.25)
    eval_data = input_lib.pretrain_data(config, workdir, 'eval', process_index=0, process_count=1)
    train_data = input_lib.pretrain_data(config, workdir, 'train', process_index=0,
                                         process_count=1)
    assert eval_data.num_examples == held_out.sum() and 0 < held_out.sum() < NUM_POSTS
    assert train_data.num_examples + eval_data.num_examples == NUM_POSTS
    assert train_data.steps_per_epoch == train_data.num_examples // 8
    eval_posts = {i for b in eval_data.iterator() for i in b['index'].tolist() if i >= 0}
    iterator = train_data.iterator()
    train_posts = {i for b in take(iterator, 3 * train_data.steps_per_epoch)
                   for i in b['index'].tolist()}
    assert eval_posts == set(np.flatnonzero(held_out).tolist())
    assert train_posts == set(np.flatnonzero(~held_out).tolist())
    # The split is a function of the ids alone.
    assert np.array_equal(sources.eval_membership(post_ids[::-1], 0.25), held_out[::-1])


def test_same_seed_same_batches_other_seed_other_batches(workdir):
    def first_batches(seed):
        config = small_config()
        config.seed = seed
        data = input_lib.pretrain_data(config, workdir, process_index=0, process_count=1)
        return take(data.iterator(), 4)

    first = first_batches(0)
    assert_batches_equal(first, first_batches(0))
    other = first_batches(1)
    assert not np.array_equal(first[0]['index'], other[0]['index'])


def test_epochs_are_reshuffled_and_crops_depend_only_on_seed_epoch_and_post(workdir):
    data = input_lib.pretrain_data(small_config(), workdir, process_index=0, process_count=1)
    steps = data.steps_per_epoch
    batches = take(data.iterator(), 2 * steps)
    epoch0 = np.concatenate([b['index'] for b in batches[:steps]])
    epoch1 = np.concatenate([b['index'] for b in batches[steps:]])
    assert len(set(epoch0.tolist())) == len(epoch0)  # no repeats within an epoch
    assert not np.array_equal(epoch0, epoch1)
    # Another batch size regroups the same stream; every post gets the same crop and flip.
    wide = input_lib.pretrain_data(small_config(global_batch_size=16), workdir,
                                   process_index=0, process_count=1)
    wide_batches = take(wide.iterator(), steps // 2)
    images = {int(i): image for b in batches[:steps]
              for i, image in zip(b['index'], b['image'], strict=True)}
    compared = 0
    for batch in wide_batches:
        for index, image in zip(batch['index'].tolist(), batch['image'], strict=True):
            np.testing.assert_array_equal(image, images[index])
            compared += 1
    assert compared == 16 * (steps // 2)
    # Crops really are random: the same post differs between epochs.
    later = {int(i): image for b in batches[steps:]
             for i, image in zip(b['index'], b['image'], strict=True)}
    assert any(not np.array_equal(later[i], images[i]) for i in later if i in images)


def test_augmentation_follows_the_epoch_not_the_position_in_the_stream(workdir):
    loader = chain.BatchLoader(sources.StoreImages(workdir / 'posts'), np.arange(NUM_POSTS),
                                  chain.make_transform(small_config().input, True),
                                  chain.ClassLabels(np.zeros(NUM_POSTS)), seed=0)
    # Post 7 at positions 1 and 30 (epoch 0), 41 and 79 (epoch 1); post 8 at position 2.
    plan = np.array([[1, 7], [30, 7], [41, 7], [79, 7], [2, 8]])
    image = loader.map(plan)['image']
    np.testing.assert_array_equal(image[0], image[1])
    np.testing.assert_array_equal(image[2], image[3])
    assert not np.array_equal(image[0], image[2])
    other_seed = chain.BatchLoader(loader.images, loader.examples, loader.transform,
                                      loader.labels, seed=1)
    assert not np.array_equal(other_seed.map(plan)['image'][0], image[0])


def test_two_processes_see_disjoint_shards_that_cover_the_data(workdir):
    config = small_config()
    single = input_lib.pretrain_data(config, workdir, process_index=0, process_count=1)
    shards = [input_lib.pretrain_data(config, workdir, process_index=p, process_count=2)
              for p in range(2)]
    assert all(s.local_batch_size == 4 for s in shards)
    steps = single.steps_per_epoch
    whole = take(single.iterator(), steps)
    halves = [take(s.iterator(), steps) for s in shards]
    for step in range(steps):
        first, second = (set(h[step]['index'].tolist()) for h in halves)
        assert not first & second
        # The global batch of a step holds the same posts whatever the process count.
        assert first | second == set(whole[step]['index'].tolist())
    evals = [input_lib.pretrain_data(config, workdir, 'eval', process_index=p, process_count=2)
             for p in range(2)]
    eval_batches = [list(e.iterator()) for e in evals]
    assert len(eval_batches[0]) == len(eval_batches[1]) == evals[0].steps_per_epoch
    eval_sets = [{i for b in batches for i in b['index'].tolist() if i >= 0}
                 for batches in eval_batches]
    assert not eval_sets[0] & eval_sets[1]
    assert len(eval_sets[0] | eval_sets[1]) == evals[0].num_examples


def test_worker_processes_give_the_same_batches_and_restore_mid_epoch(workdir):
    in_process = input_lib.pretrain_data(small_config(), workdir, process_index=0,
                                         process_count=1)
    expected = take(in_process.iterator(), 7)
    workers = input_lib.pretrain_data(small_config(num_workers=2), workdir, process_index=0,
                                      process_count=1)
    iterator = workers.iterator()
    try:
        assert_batches_equal(take(iterator, 3), expected[:3])
        state = iterator.get_state()
        assert_batches_equal(take(iterator, 4), expected[3:])
    finally:
        iterator.close()
    restored = workers.iterator()
    try:
        restored.set_state(state)
        assert_batches_equal(take(restored, 4), expected[3:])
    finally:
        restored.close()


def test_in_process_iterator_restores_mid_epoch(workdir):
    data = input_lib.pretrain_data(small_config(), workdir, process_index=0, process_count=1)
    iterator = data.iterator()
    take(iterator, data.steps_per_epoch - 1)
    state = iterator.get_state()
    expected = take(iterator, 3)  # crosses into the next epoch
    restored = data.iterator()
    restored.set_state(state)
    assert_batches_equal(take(restored, 3), expected)


def test_orbax_checkpoint_manager_restores_the_iterator(workdir, tmp_path):
    data = input_lib.pretrain_data(small_config(num_workers=1), workdir, process_index=0,
                                   process_count=1)
    state = {'step': np.array(2, np.int32)}
    iterator = data.iterator()
    restored_iterator = data.iterator()
    with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
        try:
            take(iterator, 2)
            manager.save(2, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=input_lib.iterator_save_args(iterator)))
            manager.wait_until_finished()
            expected = take(iterator, 3)
            restored = manager.restore(2, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state),
                data=input_lib.iterator_restore_args(restored_iterator)))
            assert int(restored['state']['step']) == 2
            assert restored['data'] is restored_iterator
            assert_batches_equal(take(restored_iterator, 3), expected)
        finally:
            iterator.close()
            restored_iterator.close()


def test_manifest_images_give_the_store_s_batches(workdir):
    config = small_config(pretrain_images='manifest')
    config.posts.manifest = str(workdir.parent / 'posts.jsonl')
    from_manifest = input_lib.pretrain_data(config, workdir, 'eval', process_index=0,
                                            process_count=1)
    from_store = input_lib.pretrain_data(small_config(), workdir, 'eval', process_index=0,
                                         process_count=1)
    assert_batches_equal(list(from_manifest.iterator()), list(from_store.iterator()))


def test_manifest_rows_follow_ingest_and_missing_files_become_bad_images(tmp_path):
    (tmp_path / 'a.jpg').write_bytes(post_image(1))
    rows = [{'id': 'a', 'image': 'a.jpg'}, {'id': 'a', 'image': 'a.jpg'},   # duplicate id
            {'id': 'b', 'image': 'gone.jpg'}, {'image': 'a.jpg'},           # no id: rejected
            {'id': 'c', 'image_b64': __import__('base64').b64encode(post_image(2)).decode()}]
    manifest = tmp_path / 'posts.jsonl'
    manifest.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    images, post_ids = sources.manifest_posts([manifest], '', posts.REACTION_TYPES)
    assert post_ids == ['a', 'b', 'c']
    encoded = images.read([0, 1, 2])
    assert encoded[0] == post_image(1) and encoded[1] is None and encoded[2] == post_image(2)
    loader = chain.BatchLoader(images, np.arange(3),
                                  chain.make_transform(small_config().input, False),
                                  chain.ClassLabels(np.array([0, 1, 2])), seed=0)
    batch = loader.map(np.array([[0, 0], [1, 1], [2, 2], [3, -1]]))
    assert input_lib.BAD_IMAGE_REASONS[batch['bad_image'][1]] == 'missing_file'
    np.testing.assert_array_equal(batch['weight'], [1, 0, 1, 0])
    np.testing.assert_array_equal(batch['index'], [0, 1, 2, -1])
    np.testing.assert_array_equal(batch['label'], [0, 1, 2, 0])
    assert not batch['image'][1].any() and batch['image'][0].any()


def test_bad_images_in_a_store_get_weight_zero_and_their_reason(tmp_path):
    good = post_image(3)
    bad = {1: good[:len(good) // 2], 2: b'not an image at all'}
    store_dir = tmp_path / 'posts'
    store_dir.mkdir()
    info = posts.ImageInfo('JPEG', 48, 36, 'RGB')
    rows = [posts.Post(f'p{i}', (), dict.fromkeys(posts.REACTION_TYPES, 0), info, f'x:{i}',
                       image=bad.get(i, good)) for i in range(4)]
    store_lib.write_shard(store_dir, 0, rows, posts.REACTION_TYPES)
    store_lib.write_index(store_dir, {0: 4}, posts.REACTION_TYPES, extra={})
    artifacts.StageDir(store_dir, 'ingest', {}).finish({}, {})
    loader = chain.BatchLoader(sources.StoreImages(store_dir), np.arange(4),
                                  chain.make_transform(small_config().input, True),
                                  chain.ClassLabels(np.zeros(4)), seed=0)
    batch = loader.map(np.array([[0, 0], [1, 1], [2, 2], [3, 3]]))
    reasons = [input_lib.BAD_IMAGE_REASONS[c] for c in batch['bad_image']]
    assert reasons == ['ok', 'truncated', 'not_an_image', 'ok']
    np.testing.assert_array_equal(batch['weight'], [1, 0, 0, 1])
    assert batch['image'][0].any() and not batch['image'][1:3].any()
    tally = input_lib.BadImageTally(max_fraction=0.3, min_seen=4)
    with pytest.raises(InputError, match=r'2 of 4 images .*truncated: 1, not_an_image: 1'
                                         r'.*truncated at index 1'):
        tally.update(batch['bad_image'], batch['weight'], batch['index'])


def test_global_batch_on_eight_devices(workdir):
    mesh = sharding.make_mesh(fsdp=2)
    data = input_lib.pretrain_data(small_config(), workdir, process_index=0, process_count=1,
                                   mesh=mesh)
    local = next(data.iterator())
    batch = input_lib.global_batch(local, mesh)
    assert jax.tree.structure(batch) == jax.tree.structure(local)
    image = batch['image']
    assert image.shape == (8, 16, 16, 3) and image.dtype == np.uint8
    assert image.sharding == sharding.row_sharding(mesh)
    assert len(image.addressable_shards) == 8
    assert all(s.data.shape == (1, 16, 16, 3) for s in image.addressable_shards)
    jax.tree.map(lambda g, loc: np.testing.assert_array_equal(np.asarray(g), loc), batch, local)


def test_batch_sizes_that_do_not_divide_are_refused(workdir):
    mesh = sharding.make_mesh()
    with pytest.raises(InputError, match='does not divide by the 8 row shards'):
        input_lib.global_batch({'x': np.zeros(6)}, mesh)
    with pytest.raises(InputError, match='disagree on the number of rows'):
        input_lib.global_batch({'x': np.zeros(8), 'y': np.zeros(4)}, mesh)
    with pytest.raises(InputError, match='global_batch_size=12 does not divide by the 8 row'):
        input_lib.pretrain_data(small_config(global_batch_size=12), workdir, mesh=mesh)
    with pytest.raises(InputError, match='global_batch_size=9 does not divide by the 2 proc'):
        input_lib.pretrain_data(small_config(global_batch_size=9), workdir, process_index=1,
                                process_count=2)
    with pytest.raises(InputError, match='fewer than one global batch'):
        input_lib.pretrain_data(small_config(global_batch_size=64), workdir,
                                process_index=0, process_count=1)


def test_labels_made_for_other_posts_are_refused(workdir, tmp_path):
    other = tmp_path / 'work'
    other.mkdir()
    (other / 'posts').symlink_to(workdir / 'posts')
    write_labels(other / 'labels', [f'other{i}' for i in range(NUM_POSTS)])
    with pytest.raises(InputError, match='other posts'):
        input_lib.pretrain_data(small_config(), other, process_index=0, process_count=1)
    with pytest.raises(InputError, match="no head 'comments_k99'"):
        input_lib.pretrain_data(small_config(), workdir, heads=('comments_k99',),
                                process_index=0, process_count=1)


def test_flags_are_marked_parsed_for_grain_workers():
    from absl import flags

    input_lib.ensure_flags_parsed()
    assert flags.FLAGS.is_parsed()
    assert grain.config.get_or_default('py_debug_mode') is False


def test_release_shared_memory_waits_for_grains_queued_unlinks(monkeypatch):
    """At exit, unlinks still queued on Grain's deletion thread would be left to the resource
    tracker (its 'leaked shared_memory' warning); release_shared_memory finishes them."""
    slow_close = SharedMemoryArray.close_shm_async.__func__

    def slower(cls, shm, unlink):      # a deletion thread that is still busy at exit
        time.sleep(0.3)
        slow_close(cls, shm, unlink)

    monkeypatch.setattr(SharedMemoryArray, 'close_shm_async', classmethod(slower))
    monkeypatch.setattr(SharedMemoryArray, '_del_thread_pool', None)
    SharedMemoryArray.enable_async_del(1)
    array = SharedMemoryArray((1024,), np.uint8)
    array.unlink_on_del()
    segment = f'/dev/shm/{array.shm.name}'
    assert os.path.exists(segment)
    del array                           # queued on the deletion thread, not yet unlinked
    assert os.path.exists(segment)
    input_lib.release_shared_memory()
    assert not os.path.exists(segment)
    assert SharedMemoryArray._del_thread_pool is None   # later deletions run inline
