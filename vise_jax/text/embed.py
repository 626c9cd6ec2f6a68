"""The comment-embedding writer: batched, sharded, length-bucketed, resumable; and its reader.

Input: (post_index, comment_number, text) in store order, e.g. `iter_comments(store.iter_meta())`.
Output, in `out_dir`:

  embed_settings.json        encoder identity, chunk size, format: what the chunks were made with
  embeddings-00000.npy       (n, dim) float16, L2-normalised rows (before the cast)
  index-00000.npy            (n,) structured: post_index int64, comment_number int32, row-aligned
  ...                        one pair per chunk of `chunk_size` *input* comments
  embeddings.json            written last: format, dim, counts, the shard list, the encoder

Comments that are empty after whitespace stripping get no row (they are counted). Chunk k covers
input comments [k * chunk_size, (k + 1) * chunk_size), so the chunking depends only on the input,
and a rerun after an interruption skips the chunks already on disk and recomputes the rest: the
files come out as those of an uninterrupted run. Each file is written atomically, the index last,
so a chunk counts as done when its index file exists.

Multi-process: every process passes the same input, in the same order. Chunk k belongs to process
k % process_count; chunks are processed in rounds of one chunk per process, and in every round
every process calls `encoder.encode` exactly once (with no texts if its chunk is done or absent),
so the jitted steps inside, which are collectives over the mesh, run the same number of times with
the same shapes everywhere (the encoder agrees on the per-bucket batch counts). Each process
writes its own chunks; `out_dir` must be a filesystem all processes share, and process 0 writes
embeddings.json once all are done. Every process reads every comment's text (to count and skip);
at paper scale the input should be post metadata only, as PostsStore.iter_meta() gives.
"""

from __future__ import annotations

import itertools
import logging
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
FORMAT_VERSION = 1
INDEX_FILE = 'embeddings.json'
SETTINGS_FILE = 'embed_settings.json'
INDEX_DTYPE = np.dtype([('post_index', '<i8'), ('comment_number', '<i4')])
DEFAULT_CHUNK_SIZE = 32_768

Comment = tuple[int, int, str]


def embeddings_name(chunk: int) -> str:
    return f'embeddings-{chunk:05d}.npy'


def index_name(chunk: int) -> str:
    return f'index-{chunk:05d}.npy'


def iter_comments(posts: Iterable[Any]) -> Iterator[Comment]:
    """(post_index, comment_number, text) for every comment of posts with `.comments`, in order."""
    for post_index, post in enumerate(posts):
        for comment_number, text in enumerate(post.comments):
            yield post_index, comment_number, text


def embed_comments(comments: Iterable[Comment], encoder: TextEncoder,
                   out_dir: str | os.PathLike, *, mesh=None, batch_size: int = 256,
                   chunk_size: int = DEFAULT_CHUNK_SIZE,
                   total: int | None = None) -> dict[str, Any]:
    """Embeds every non-empty comment into float16 shards in `out_dir`; returns a summary.

    `batch_size` is the number of rows each process feeds the encoder per step; `total` (the
    number of comments, if known) only sizes the progress bar. Resumes the chunks already there.
    """
    if chunk_size < 1:
        raise InputError(f'embed: chunk_size must be >= 1, got {chunk_size}')
    out_dir = Path(out_dir)
    settings = {'format': FORMAT, 'version': FORMAT_VERSION, 'chunk_size': chunk_size,
                'encoder': encoder.describe()}
    _claim_directory(out_dir, settings)
    process, processes = jax.process_index(), jax.process_count()
    counts = {'num_comments': 0, 'num_empty': 0, 'num_chunks': 0, 'chunks_skipped': 0,
              'chunks_written': 0}
    started = time.perf_counter()
    with tqdm.tqdm(total=total, unit='comment', unit_scale=True, desc='embed', smoothing=0.1,
                   disable=None if process == 0 else True) as bar:
        for round_chunks in _rounds(_chunks(comments, chunk_size), processes):
            for _, chunk in round_chunks:
                counts['num_comments'] += len(chunk)
                counts['num_empty'] += sum(1 for _, _, text in chunk if not text.strip())
            counts['num_chunks'] += len(round_chunks)
            mine = round_chunks[process] if process < len(round_chunks) else None
            done = mine is None or chunk_is_done(out_dir, mine[0])
            progress = _RoundProgress(bar)
            _embed_round(encoder, out_dir, None if done else mine, mesh, batch_size, progress)
            if mine is not None:
                counts['chunks_skipped' if done else 'chunks_written'] += 1
            progress.finish(sum(len(chunk) for _, chunk in round_chunks))
    _wait_for_all_processes('vise_jax.text.embed: chunks written')
    counts['num_embedded'] = counts['num_comments'] - counts['num_empty']
    if process == 0:
        write_index(out_dir, counts, settings)
    _wait_for_all_processes('vise_jax.text.embed: index written')
    seconds = time.perf_counter() - started
    log.info('embed: %d comments (%d empty) in %d chunks (%d already on disk) in %.1fs',
             counts['num_comments'], counts['num_empty'], counts['num_chunks'],
             counts['chunks_skipped'], seconds)
    return {**counts, 'dim': encoder.dim, 'encoder': encoder.name, 'seconds': round(seconds, 3)}


class _RoundProgress:
    """Moves the bar as the encoder finishes texts, then by the rest of the round (empty and
    repeated comments, chunks on disk, other processes' chunks)."""

    def __init__(self, bar: tqdm.tqdm):
        self.bar = bar
        self.shown = 0

    def __call__(self, num_texts: int) -> None:
        self.shown += num_texts
        self.bar.update(num_texts)

    def finish(self, round_total: int) -> None:
        self.bar.update(round_total - self.shown)


def _claim_directory(out_dir: Path, settings: dict[str, Any]) -> None:
    """Records what the chunks are made with; refuses to mix chunks of different settings."""
    path = out_dir / SETTINGS_FILE
    if jax.process_index() == 0 and not path.exists():
        artifacts.atomic_write_json(path, settings)
    _wait_for_all_processes('vise_jax.text.embed: settings written')
    found = artifacts.read_json(path)
    if artifacts.fingerprint(found) != artifacts.fingerprint(settings):
        raise InputError(f'{out_dir} holds embeddings made with other settings '
                         f'({path}: chunk_size {found.get("chunk_size")}, encoder '
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
    return (out_dir / index_name(chunk)).exists() and (out_dir / embeddings_name(chunk)).exists()


def _embed_round(encoder: TextEncoder, out_dir: Path, chunk: tuple[int, list[Comment]] | None,
                 mesh, batch_size: int, progress: Callable[[int], None]) -> None:
    """One encode call per process per round (collective for the JAX encoders)."""
    kept = [] if chunk is None else [c for c in chunk[1] if c[2].strip()]
    vectors = encoder.encode([text for _, _, text in kept], batch_size=batch_size, mesh=mesh,
                             progress=progress)
    if chunk is not None:
        write_chunk(out_dir, chunk[0], vectors, kept)


def write_chunk(out_dir: Path, chunk: int, vectors: np.ndarray,
                kept: Sequence[Comment]) -> None:
    """The chunk's embeddings, then its index (its completion mark), each atomically."""
    index = np.zeros(len(kept), INDEX_DTYPE)
    index['post_index'] = [c[0] for c in kept]
    index['comment_number'] = [c[1] for c in kept]
    _atomic_save(out_dir / embeddings_name(chunk), np.asarray(vectors, np.float16))
    _atomic_save(out_dir / index_name(chunk), index)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    with artifacts.atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.save(f, array, allow_pickle=False)


def write_index(out_dir: Path, counts: dict[str, int], settings: dict[str, Any]) -> None:
    """embeddings.json: the shard list read back from disk (every process's chunks)."""
    shards = []
    for chunk in range(counts['num_chunks']):
        rows = np.load(out_dir / index_name(chunk), mmap_mode='r').shape[0]
        shape = np.load(out_dir / embeddings_name(chunk), mmap_mode='r').shape
        if shape != (rows, settings['encoder']['dim']):
            raise RuntimeError(f'{out_dir}: chunk {chunk} has embeddings {shape} for {rows} rows')
        shards.append({'embeddings': embeddings_name(chunk), 'index': index_name(chunk),
                       'num_rows': int(rows)})
    if sum(s['num_rows'] for s in shards) != counts['num_embedded']:
        raise RuntimeError(f'{out_dir}: the shards hold {sum(s["num_rows"] for s in shards)} '
                           f'rows, {counts["num_embedded"]} comments were embedded')
    artifacts.atomic_write_json(out_dir / INDEX_FILE, {
        'format': FORMAT, 'version': FORMAT_VERSION, 'dtype': 'float16',
        'dim': settings['encoder']['dim'], 'chunk_size': settings['chunk_size'],
        'num_comments': counts['num_comments'], 'num_empty': counts['num_empty'],
        'num_embedded': counts['num_embedded'], 'encoder': settings['encoder'],
        'shards': shards})


def _wait_for_all_processes(name: str) -> None:
    if jax.process_count() > 1:
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
