"""The comment-embedding writer: batched, sharded, length-bucketed, resumable; and its reader.

Input, either of:

* `PostComments(posts)`: the comments of a posts store (or of any sequence of posts), read by
  post range. Chunk k covers posts [k * P, (k + 1) * P), P = `posts_per_chunk`: by default
  `chunk_size` divided by the mean number of comments per post over an evenly spaced sample of
  at most 1,000 posts (the same on every process and every rerun; recorded in
  embed_settings.json), so a chunk holds about `chunk_size` comments, some more, some fewer.
  Chunk boundaries fall between posts, so a post's comments are never split between shards.
  This is what the embed stage uses.
* An iterable of (post_index, comment_number, text) in store order, e.g. `iter_comments(posts)`.
  Chunk k covers input comments [k * chunk_size, (k + 1) * chunk_size); every process reads the
  whole iterable to find its chunks. For inputs without random access.

Output, in `out_dir`:

  embed_settings.json        encoder identity, chunking, format: what the chunks were made with
  embeddings-00000.npy       (n, dim) float16, L2-normalised rows (before the cast)
  chunk-00000.json           the chunk's post range and number of input comments (empty included)
  index-00000.npy            (n,) structured: post_index int64, comment_number int32, row-aligned
  ...                        one triple per chunk
  embeddings.json            written last: format, dim, counts, the shard list, the encoder

Rows are in store order (post, then comment). Comments that are empty after whitespace stripping
get no row (they are counted). The chunking depends only on the input, and a rerun after an
interruption skips the chunks already on disk (without reading their posts) and computes the
rest: the files come out as those of an uninterrupted run. Each file is written atomically, the
index last, so a chunk counts as done when its index file exists.

Multi-process: chunk k belongs to process k % process_count. With PostComments a process reads
only the posts of its own chunks (plus the chunking sample). Chunks are processed in rounds of
one chunk per process, and in every round every process calls `encoder.encode` exactly once (with
no texts if its chunk is done or absent), so the jitted steps inside, which are collectives over
the mesh, run the same number of times with the same shapes everywhere (the encoder agrees on the
per-bucket batch counts). Each process writes its own chunks; `out_dir` must be a filesystem all
processes share, and process 0 writes embeddings.json once all are done. `process_index` /
`process_count` default to JAX's; given explicitly in a single JAX process, they split the work
between independent runs (no collectives, no barriers): each writes its own chunks, and whichever
finds every chunk on disk at its end writes embeddings.json. The output is the same for any
number of processes.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from vise_jax import artifacts
from vise_jax.errors import InputError
from vise_jax.text.base import TextEncoder

log = logging.getLogger(__name__)

FORMAT = 'vise_jax.comment_embeddings'
FORMAT_VERSION = 2
INDEX_FILE = 'embeddings.json'
SETTINGS_FILE = 'embed_settings.json'
INDEX_DTYPE = np.dtype([('post_index', '<i8'), ('comment_number', '<i4')])
DEFAULT_CHUNK_SIZE = 32_768
CHUNKING_SAMPLE = 1000   # posts read to turn chunk_size (comments) into posts per chunk

Comment = tuple[int, int, str]


def embeddings_name(chunk: int) -> str:
    return f'embeddings-{chunk:05d}.npy'


def index_name(chunk: int) -> str:
    return f'index-{chunk:05d}.npy'


def chunk_record_name(chunk: int) -> str:
    return f'chunk-{chunk:05d}.json'


def iter_comments(posts: Iterable[Any]) -> Iterator[Comment]:
    """(post_index, comment_number, text) for every comment of posts with `.comments`, in order."""
    for post_index, post in enumerate(posts):
        for comment_number, text in enumerate(post.comments):
            yield post_index, comment_number, text


class PostComments:
    """The comments of a sequence of posts, read by post range.

    `posts` is a PostsStore (read with `iter_meta_range`, which reads only the records asked
    for) or any sequence of objects with `.comments` (indexed one post at a time).
    """

    def __init__(self, posts: Any):
        self.posts = posts

    def __len__(self) -> int:
        """The number of posts."""
        return len(self.posts)

    def __iter__(self) -> Iterator[Comment]:
        """Every comment in order, read 1,024 posts at a time."""
        for start in range(0, len(self), 1024):
            yield from self.read(start, min(len(self), start + 1024))

    def _posts(self, start: int, stop: int) -> Iterable[Any]:
        if hasattr(self.posts, 'iter_meta_range'):
            return self.posts.iter_meta_range(start, stop)
        return (self.posts[i] for i in range(start, stop))

    def read(self, start: int, stop: int) -> list[Comment]:
        """(post_index, comment_number, text) of every comment of posts [start, stop)."""
        return [(post_index, number, text)
                for post_index, post in zip(range(start, stop), self._posts(start, stop),
                                            strict=True)
                for number, text in enumerate(post.comments)]

    def posts_per_chunk(self, chunk_size: int, sample: int = CHUNKING_SAMPLE) -> int:
        """Posts per chunk for about `chunk_size` comments per chunk, from the mean number of
        comments of up to `sample` evenly spaced posts (deterministic)."""
        if len(self) == 0:
            return 1
        positions = np.unique(np.linspace(0, len(self) - 1, min(len(self), sample)).round()
                              .astype(np.int64)).tolist()
        if hasattr(self.posts, 'meta_many'):
            posts = self.posts.meta_many(positions)
        else:
            posts = [self.posts[i] for i in positions]
        comments = sum(len(post.comments) for post in posts)
        if comments == 0:
            return chunk_size
        return max(1, round(chunk_size * len(positions) / comments))


def embed_comments(comments: PostComments | Iterable[Comment], encoder: TextEncoder,
                   out_dir: str | os.PathLike, *, mesh=None, batch_size: int = 256,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, total: int | None = None,
                   posts_per_chunk: int | None = None, process_index: int | None = None,
                   process_count: int | None = None) -> dict[str, Any]:
    """Embeds every non-empty comment into float16 shards in `out_dir`; returns a summary.

    `batch_size` is the number of rows each process feeds the encoder per step. With
    PostComments, `posts_per_chunk` overrides the chunking derived from `chunk_size`; with an
    iterable of comments, `total` (the number of comments, if known) sizes the progress bar.
    Resumes the chunks already there.
    """
    if chunk_size < 1:
        raise InputError(f'embed: chunk_size must be >= 1, got {chunk_size}')
    out_dir = Path(out_dir)
    process, processes, lockstep = _processes(process_index, process_count)
    settings = {'format': FORMAT, 'version': FORMAT_VERSION, 'chunk_size': chunk_size,
                'encoder': encoder.describe()}
    by_posts = isinstance(comments, PostComments)
    if by_posts:
        if posts_per_chunk is None:
            posts_per_chunk = comments.posts_per_chunk(chunk_size)
        if posts_per_chunk < 1:
            raise InputError(f'embed: posts_per_chunk must be >= 1, got {posts_per_chunk}')
        settings.update(chunks='posts', posts_per_chunk=int(posts_per_chunk),
                        num_posts=len(comments))
    else:
        settings['chunks'] = 'comments'
    _claim_directory(out_dir, settings, process, lockstep)
    started = time.perf_counter()
    with tqdm.tqdm(total=len(comments) if by_posts else total,
                   unit='post' if by_posts else 'comment', unit_scale=True, desc='embed',
                   smoothing=0.1, disable=None if process == 0 else True) as bar:
        if by_posts:
            mine = _embed_by_posts(comments, posts_per_chunk, encoder, out_dir, mesh, batch_size,
                                   process, processes, bar)
        else:
            mine = _embed_by_comments(comments, chunk_size, encoder, out_dir, mesh, batch_size,
                                      process, processes, bar)
    num_chunks = mine.pop('num_chunks')
    _wait_for_all_processes('vise_jax.text.embed: chunks written', lockstep)
    complete = all(chunk_is_done(out_dir, k) for k in range(num_chunks))
    if complete and (process == 0 or not lockstep):
        write_index(out_dir, num_chunks, settings)
    _wait_for_all_processes('vise_jax.text.embed: index written', lockstep)
    counts = _counts(out_dir, num_chunks)
    seconds = time.perf_counter() - started
    log.info('embed: %d comments (%d empty) in %d chunks (process %d of %d: %d written, %d '
             'already on disk) in %.1fs%s', counts['num_comments'], counts['num_empty'],
             num_chunks, process, processes, mine['chunks_written'], mine['chunks_skipped'],
             seconds, '' if complete else '; other processes still have chunks to write')
    summary = {**counts, 'num_chunks': num_chunks, **mine, 'complete': complete,
               'dim': encoder.dim, 'encoder': encoder.name, 'seconds': round(seconds, 3)}
    if by_posts:
        summary['posts_per_chunk'] = int(posts_per_chunk)
    return summary


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int, bool]:
    """(this process, processes, whether they are JAX processes that must run in lockstep)."""
    jax_index, jax_count = jax.process_index(), jax.process_count()
    index = jax_index if process_index is None else int(process_index)
    count = jax_count if process_count is None else int(process_count)
    if not 0 <= index < count:
        raise InputError(f'embed: process_index {index} out of range for {count} processes')
    if jax_count > 1 and (index, count) != (jax_index, jax_count):
        raise InputError(f'embed: under jax.distributed the processes are JAX\'s ({jax_index} of '
                         f'{jax_count}), got process {index} of {count}')
    return index, count, jax_count > 1


def _embed_by_posts(comments: PostComments, posts_per_chunk: int, encoder: TextEncoder,
                    out_dir: Path, mesh, batch_size: int, process: int, processes: int,
                    bar: tqdm.tqdm) -> dict[str, int]:
    """Chunks of posts; each process reads only the posts of its own unfinished chunks."""
    num_posts = len(comments)
    num_chunks = math.ceil(num_posts / posts_per_chunk)
    done = {'num_chunks': num_chunks, 'chunks_skipped': 0, 'chunks_written': 0}
    for first in range(0, num_chunks, processes):
        number = first + process
        round_posts = (min(num_posts, (first + processes) * posts_per_chunk)
                       - first * posts_per_chunk)
        chunk = None
        if number < num_chunks:
            if chunk_is_done(out_dir, number):
                done['chunks_skipped'] += 1
            else:
                start = number * posts_per_chunk
                stop = min(num_posts, start + posts_per_chunk)
                chunk = (number, comments.read(start, stop), (start, stop))
                done['chunks_written'] += 1
        kept = _kept(chunk)
        progress = _RoundProgress(bar, scale=round_posts / max(len(kept), 1),
                                  limit=round_posts)
        _embed_round(encoder, out_dir, chunk, kept, mesh, batch_size, progress)
        progress.finish(round_posts)
    return done


def _embed_by_comments(comments: Iterable[Comment], chunk_size: int, encoder: TextEncoder,
                       out_dir: Path, mesh, batch_size: int, process: int, processes: int,
                       bar: tqdm.tqdm) -> dict[str, int]:
    """Chunks of `chunk_size` input comments; every process reads every comment."""
    done = {'num_chunks': 0, 'chunks_skipped': 0, 'chunks_written': 0}
    for round_chunks in _rounds(_chunks(comments, chunk_size), processes):
        done['num_chunks'] += len(round_chunks)
        mine = round_chunks[process] if process < len(round_chunks) else None
        chunk = None
        if mine is not None:
            number, rows = mine
            if chunk_is_done(out_dir, number):
                done['chunks_skipped'] += 1
            else:
                chunk = (number, rows, (rows[0][0], rows[-1][0] + 1))
                done['chunks_written'] += 1
        progress = _RoundProgress(bar)
        _embed_round(encoder, out_dir, chunk, _kept(chunk), mesh, batch_size, progress)
        progress.finish(sum(len(rows) for _, rows in round_chunks))
    return done


class _RoundProgress:
    """Moves the bar as the encoder finishes texts (each worth `scale` units, never past
    `limit`), then by the rest of the round (empty and repeated comments, chunks on disk, other
    processes' chunks)."""

    def __init__(self, bar: tqdm.tqdm, scale: float = 1.0, limit: float | None = None):
        self.bar = bar
        self.scale = scale
        self.limit = limit
        self.shown = 0

    def __call__(self, num_texts: int) -> None:
        step = num_texts * self.scale
        if self.limit is not None:
            step = max(0.0, min(step, self.limit - self.shown))
        self.shown += step
        self.bar.update(step)

    def finish(self, round_total: int) -> None:
        self.bar.update(max(round_total - self.shown, 0))


def _claim_directory(out_dir: Path, settings: dict[str, Any], process: int,
                     lockstep: bool) -> None:
    """Records what the chunks are made with; refuses to mix chunks of different settings."""
    path = out_dir / SETTINGS_FILE
    if (process == 0 or not lockstep) and not path.exists():
        artifacts.atomic_write_json(path, settings)
    _wait_for_all_processes('vise_jax.text.embed: settings written', lockstep)
    found = artifacts.read_json(path)
    if artifacts.fingerprint(found) != artifacts.fingerprint(settings):
        raise InputError(f'{out_dir} holds embeddings made with other settings '
                         f'({path}: chunk_size {found.get("chunk_size")}, '
                         f'{found.get("chunks")} chunks, posts per chunk '
                         f'{found.get("posts_per_chunk")}, encoder '
                         f'{found.get("encoder", {}).get("name")}); remove it to rebuild')


def _chunks(comments: Iterable[Comment], chunk_size: int) -> Iterator[tuple[int, list[Comment]]]:
    iterator = iter(comments)
    for number in itertools.count():
        chunk = list(itertools.islice(iterator, chunk_size))
        if not chunk:
            return
        yield number, chunk


def _rounds(chunks: Iterator[tuple[int, list[Comment]]],
            processes: int) -> Iterator[list[tuple[int, list[Comment]]]]:
    while round_chunks := list(itertools.islice(chunks, processes)):
        yield round_chunks


def chunk_is_done(out_dir: Path, chunk: int) -> bool:
    return all((out_dir / name(chunk)).exists()
               for name in (index_name, embeddings_name, chunk_record_name))


_Chunk = tuple[int, list[Comment], tuple[int, int]]   # number, input comments, post range


def _kept(chunk: _Chunk | None) -> list[Comment]:
    return [] if chunk is None else [c for c in chunk[1] if c[2].strip()]


def _embed_round(encoder: TextEncoder, out_dir: Path, chunk: _Chunk | None,
                 kept: list[Comment], mesh, batch_size: int,
                 progress: Callable[[int], None]) -> None:
    """One encode call per process per round (collective for the JAX encoders)."""
    vectors = encoder.encode([text for _, _, text in kept], batch_size=batch_size, mesh=mesh,
                             progress=progress)
    if chunk is not None:
        number, rows, (start, stop) = chunk
        write_chunk(out_dir, number, vectors, kept,
                    record={'posts': [int(start), int(stop)], 'num_comments': len(rows)})


def write_chunk(out_dir: Path, chunk: int, vectors: np.ndarray, kept: Sequence[Comment],
                record: dict[str, Any] | None = None) -> None:
    """The chunk's embeddings, its record, then its index (its completion mark), atomically."""
    index = np.zeros(len(kept), INDEX_DTYPE)
    index['post_index'] = [c[0] for c in kept]
    index['comment_number'] = [c[1] for c in kept]
    record = {'posts': None, 'num_comments': len(kept), **(record or {}),
              'num_rows': len(kept)}
    _atomic_save(out_dir / embeddings_name(chunk), np.asarray(vectors, np.float16))
    artifacts.atomic_write_json(out_dir / chunk_record_name(chunk), record)
    _atomic_save(out_dir / index_name(chunk), index)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    with artifacts.atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.save(f, array, allow_pickle=False)


def _counts(out_dir: Path, num_chunks: int) -> dict[str, int]:
    """Input comments, empty ones and rows over the chunks on disk (all of them once done)."""
    records = [artifacts.read_json(out_dir / chunk_record_name(k)) for k in range(num_chunks)
               if chunk_is_done(out_dir, k)]
    comments = sum(r['num_comments'] for r in records)
    rows = sum(r['num_rows'] for r in records)
    return {'num_comments': comments, 'num_empty': comments - rows, 'num_embedded': rows}


def write_index(out_dir: Path, num_chunks: int, settings: dict[str, Any]) -> None:
    """embeddings.json: the shard list read back from disk (every process's chunks)."""
    shards = []
    for chunk in range(num_chunks):
        record = artifacts.read_json(out_dir / chunk_record_name(chunk))
        rows = np.load(out_dir / index_name(chunk), mmap_mode='r').shape[0]
        shape = np.load(out_dir / embeddings_name(chunk), mmap_mode='r').shape
        if shape != (rows, settings['encoder']['dim']) or rows != record['num_rows']:
            raise RuntimeError(f'{out_dir}: chunk {chunk} has embeddings {shape} for {rows} rows '
                               f'({record["num_rows"]} in {chunk_record_name(chunk)})')
        shards.append({'embeddings': embeddings_name(chunk), 'index': index_name(chunk),
                       'num_rows': int(rows), 'posts': record['posts'],
                       'num_comments': record['num_comments']})
    counts = _counts(out_dir, num_chunks)
    artifacts.atomic_write_json(out_dir / INDEX_FILE, {
        'format': FORMAT, 'version': FORMAT_VERSION, 'dtype': 'float16',
        'dim': settings['encoder']['dim'], 'chunk_size': settings['chunk_size'],
        'chunks': settings['chunks'], 'posts_per_chunk': settings.get('posts_per_chunk'),
        **counts, 'encoder': settings['encoder'], 'shards': shards})


def _wait_for_all_processes(name: str, lockstep: bool = True) -> None:
    if lockstep and jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class EmbeddingShards:
    """Reads what `embed_comments` wrote: the rows, shard by shard, and where they came from."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        path = self.directory / INDEX_FILE
        if not path.exists():
            raise InputError(f'{self.directory} holds no finished comment embeddings '
                             f'(no {INDEX_FILE}); run the embed stage first')
        self.index = artifacts.read_json(path)
        if self.index.get('format') != FORMAT or self.index.get('version') != FORMAT_VERSION:
            raise InputError(f'{path}: not {FORMAT} v{FORMAT_VERSION}')
        self.dim: int = self.index['dim']
        self.encoder: dict[str, Any] = self.index['encoder']
        self.shard_sizes = np.asarray([s['num_rows'] for s in self.index['shards']], np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)])

    def __len__(self) -> int:
        """Rows (non-empty comments) in all shards."""
        return int(self.shard_starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self.shard_sizes)

    def shard(self, number: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(embeddings (n, dim) float16 memory-mapped, post_index int64, comment_number int32)."""
        entry = self.index['shards'][number]
        embeddings = np.load(self.directory / entry['embeddings'], mmap_mode='r')
        index = np.load(self.directory / entry['index'])
        return embeddings, index['post_index'], index['comment_number']

    def shard_index(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        """(post_index int64, comment_number int32) of one shard, without its embeddings."""
        index = np.load(self.directory / self.index['shards'][number]['index'])
        return index['post_index'], index['comment_number']

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for number in range(self.num_shards):
            yield self.shard(number)

    def post_index(self) -> np.ndarray:
        """The post of every row, all shards in order (int64)."""
        return self._concatenated_index('post_index', np.int64)

    def comment_number(self) -> np.ndarray:
        """The comment's position within its post, for every row (int32)."""
        return self._concatenated_index('comment_number', np.int32)

    def _concatenated_index(self, field: str, dtype) -> np.ndarray:
        out = np.empty(len(self), dtype)
        for number, entry in enumerate(self.index['shards']):
            start, stop = self.shard_starts[number], self.shard_starts[number + 1]
            out[start:stop] = np.load(self.directory / entry['index'])[field]
        return out

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """`n` rows drawn uniformly without replacement (all rows if n >= len), as float32,
        in storage order; for fitting k-means on a sample."""
        rows = self.sample_rows(n, seed)
        out = np.empty((rows.size, self.dim), np.float32)
        shard_of = np.searchsorted(self.shard_starts, rows, side='right') - 1
        for number in np.unique(shard_of):
            embeddings = self.shard(int(number))[0]
            selected = np.flatnonzero(shard_of == number)
            out[selected] = embeddings[rows[selected] - self.shard_starts[number]]
        return out

    def sample_rows(self, n: int, seed: int = 0) -> np.ndarray:
        """The sorted global row numbers `sample(n, seed)` returns."""
        if n >= len(self):
            return np.arange(len(self))
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(len(self), size=n, replace=False))
