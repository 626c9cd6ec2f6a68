"""The posts store: validated posts as ArrayRecord shards with random access.

Metadata (id, comments, reactions, image info, source) and image bytes live in separate,
index-aligned shards, so the text stages read every comment without touching a byte of image
data, and the input pipeline reads images by global index. Both are plain ArrayRecord files, so
Grain's ArrayRecordDataSource (and anything else that reads ArrayRecord) opens them directly.

Layout of a store directory:
  store.json                      format, version, reaction types, shard list and counts
  meta-00000.array_record ...     one JSON record per post
  images-00000.array_record ...   the encoded image file bytes, same order
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from vise_jax import artifacts
from vise_jax.errors import InputError
from vise_jax.posts.schema import ImageInfo, Post

STORE_FORMAT = 'vise_jax.posts'
STORE_VERSION = 1
STORE_INDEX = 'store.json'
# One record per chunk, so random access reads exactly one post.
_WRITER_OPTIONS = 'group_size:1'


def meta_shard_name(shard: int) -> str:
    return f'meta-{shard:05d}.array_record'


def image_shard_name(shard: int) -> str:
    return f'images-{shard:05d}.array_record'


def encode_meta(post: Post, reaction_types: Sequence[str]) -> bytes:
    record = {
        'id': post.id,
        'comments': list(post.comments),
        'reactions': [post.reactions[name] for name in reaction_types],
        'image': {'format': post.image_info.format, 'width': post.image_info.width,
                  'height': post.image_info.height, 'mode': post.image_info.mode},
        'source': post.source,
    }
    return json.dumps(record, ensure_ascii=False, separators=(',', ':')).encode('utf-8')


def decode_meta(data: bytes, reaction_types: Sequence[str], image: bytes | None = None) -> Post:
    record = json.loads(data)
    return Post(id=record['id'], comments=tuple(record['comments']),
                reactions=dict(zip(reaction_types, record['reactions'], strict=True)),
                image_info=ImageInfo(**record['image']), source=record['source'], image=image)


def write_shard(directory: Path, shard: int, posts: Sequence[Post],
                reaction_types: Sequence[str]) -> None:
    """Writes one meta shard and its image shard, each atomically."""
    _write_records(directory / meta_shard_name(shard),
                   (encode_meta(post, reaction_types) for post in posts))
    _write_records(directory / image_shard_name(shard), (post.image for post in posts))


def _write_records(path: Path, records) -> None:
    with artifacts.atomic_path(path) as tmp:
        writer = ArrayRecordWriter(str(tmp), _WRITER_OPTIONS)
        try:
            for record in records:
                writer.write(record)
        finally:
            writer.close()


def write_index(directory: Path, shard_sizes: dict[int, int], reaction_types: Sequence[str],
                extra: dict[str, Any]) -> dict[str, Any]:
    """Writes store.json listing the non-empty shards in order."""
    shards = [{'meta': meta_shard_name(k), 'images': image_shard_name(k), 'num_posts': n}
              for k, n in sorted(shard_sizes.items()) if n > 0]
    index = {
        'format': STORE_FORMAT,
        'version': STORE_VERSION,
        'num_posts': sum(s['num_posts'] for s in shards),
        'reaction_types': list(reaction_types),
        'shards': shards,
        **extra,
    }
    artifacts.atomic_write_json(directory / STORE_INDEX, index)
    return index


def read_shard_meta(directory: Path, shard: int, reaction_types: Sequence[str]) -> list[Post]:
    """Reads one meta shard sequentially (used to resume an interrupted ingest)."""
    path = directory / meta_shard_name(shard)
    if not path.exists():
        return []
    return [decode_meta(record, reaction_types) for record in _read_all(path)]


def _read_all(path: Path) -> list[bytes]:
    reader = ArrayRecordReader(str(path))
    try:
        return reader.read_all()
    finally:
        reader.close()


def _read_range(path: Path, begin: int, end: int) -> list[bytes]:
    """Records [begin, end) of one ArrayRecord file."""
    reader = ArrayRecordReader(str(path))
    try:
        return reader.read(begin, end)
    finally:
        reader.close()


class PostsStore:
    """Random access to a finished posts store, in the style of `tfds.data_source`.

    `len(store)` and `store[i]` (a Post with its image bytes) make it usable directly as a Grain
    source; `meta(i)`, `meta_many(indices)`, `iter_meta()` and `iter_meta_range(start, stop)`
    skip the image bytes.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / STORE_INDEX
        if not (self.directory / artifacts.STAGE_RECORD).exists() or not index_path.exists():
            raise InputError(f'{self.directory} is not a finished posts store '
                             f'(no {artifacts.STAGE_RECORD} / {STORE_INDEX}); run ingest first')
        self.index = artifacts.read_json(index_path)
        if self.index.get('format') != STORE_FORMAT or self.index.get('version') != STORE_VERSION:
            raise InputError(f'{index_path}: not a {STORE_FORMAT} v{STORE_VERSION} store '
                             f"(found {self.index.get('format')} v{self.index.get('version')})")
        self.reaction_types = tuple(self.index['reaction_types'])
        self._meta_paths = [str(self.directory / s['meta']) for s in self.index['shards']]
        self._image_paths = [str(self.directory / s['images']) for s in self.index['shards']]
        self._meta_source = None
        self._image_source = None

    def __len__(self) -> int:
        return self.index['num_posts']

    @property
    def meta_source(self) -> grain.sources.ArrayRecordDataSource:
        """Raw JSON metadata records by global index (opened lazily: forks stay cheap)."""
        if self._meta_source is None:
            self._meta_source = _source(self._meta_paths)
        return self._meta_source

    @property
    def image_source(self) -> grain.sources.ArrayRecordDataSource:
        """Raw encoded image bytes by global index."""
        if self._image_source is None:
            self._image_source = _source(self._image_paths)
        return self._image_source

    def meta(self, index: int) -> Post:
        return decode_meta(self.meta_source[self._check(index)], self.reaction_types)

    def image_bytes(self, index: int) -> bytes:
        return self.image_source[self._check(index)]

    def __getitem__(self, index: int) -> Post:
        index = self._check(index)
        return decode_meta(self.meta_source[index], self.reaction_types,
                           image=self.image_source[index])

    def iter_meta(self) -> Iterator[Post]:
        """All posts in order without images, reading shards sequentially (fast)."""
        for path in self._meta_paths:
            for record in _read_all(Path(path)):
                yield decode_meta(record, self.reaction_types)

    @property
    def shard_starts(self) -> list[int]:
        """The global index of each shard's first post, then the number of posts (from
        store.json: nothing is read)."""
        starts = [0]
        for shard in self.index['shards']:
            starts.append(starts[-1] + shard['num_posts'])
        return starts

    def iter_meta_range(self, start: int, stop: int) -> Iterator[Post]:
        """Posts [start, stop) in order without images, reading only those records (a
        sequential read of the part of each shard the range covers)."""
        start, stop = max(int(start), 0), min(int(stop), len(self))
        starts = self.shard_starts
        for shard, path in enumerate(self._meta_paths):
            first, end = max(start, starts[shard]), min(stop, starts[shard + 1])
            if first >= end:
                continue
            for record in _read_range(Path(path), first - starts[shard], end - starts[shard]):
                yield decode_meta(record, self.reaction_types)

    def meta_many(self, indices: Sequence[int]) -> list[Post]:
        """The posts at `indices` (random reads, in the order given), without images."""
        indices = [self._check(i) for i in indices]
        if not indices:
            return []
        return [decode_meta(record, self.reaction_types)
                for record in self.meta_source.__getitems__(indices)]

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f'post index {index} out of range for a store of {len(self)} posts')
        return index


def _source(paths: list[str]) -> grain.sources.ArrayRecordDataSource:
    if not paths:
        raise InputError('the posts store is empty: ingest accepted no posts')
    return grain.sources.ArrayRecordDataSource(paths)
