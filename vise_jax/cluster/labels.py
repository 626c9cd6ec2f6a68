"""Pseudo labels: per post and per head, what the ResNet learns to predict.

A head is one engagement type at one clustering granularity, named like 'comments_k1000' or
'reactions_k50'.

* Comment heads: a post has several comments, so its label is the multiset of its comments'
  cluster ids, stored in CSR form (`offsets`, `ids`: a post's ids are
  ids[offsets[post]:offsets[post + 1]], in comment order); the soft target is their normalised
  histogram, computed per batch by the input pipeline. A post without comments is masked.
* Reaction heads: one cluster id per post, -1 (masked) where the post has no reactions.
* Class heads ('object_k10'): a known class per post, for the supervised baseline; stored and
  trained like reaction heads (one id, -1 where the post has no class).

On disk (a directory written by the cluster stage): labels.json (version, num_posts, a digest of
the post ids the labels are aligned with, and per head its kind, K, encoder, centroid hash) and
one directory per head holding plain .npy files: `<head>/ids.npy` (int32) and, for comment
heads, `<head>/offsets.npy` (int64, num_posts + 1). Readers memory-map them
(`np.load(mmap_mode='r')`), so a process touches only the pages of the posts it reads and
processes on one host share the page cache. The cluster stage writes comment heads shard by
shard (`CommentLabelsWriter`), never holding every comment's id.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vise_jax import artifacts
from vise_jax.errors import InputError
from vise_jax.specs import parse_pair

COMMENTS = 'comments'
REACTIONS = 'reactions'
CLASSES = 'classes'
LABELS_INDEX = 'labels.json'
LABELS_VERSION = 2   # 2: one directory of .npy files per head (memory-mapped); 1: <head>.npz
IDS_FILE = 'ids.npy'
OFFSETS_FILE = 'offsets.npy'
_OFFSET_BLOCK = 1 << 20   # posts whose offsets are written at a time


def head_name(kind: str, k: int) -> str:
    return f'{kind}_k{k}'


def post_ids_digest(post_ids: Iterable[str]) -> str:
    """Identifies the exact sequence of posts labels are aligned with."""
    digest = PostIdsDigest()
    for _ in digest.passing(post_ids):
        pass
    return digest.hexdigest()


class PostIdsDigest:
    """`post_ids_digest` of the ids that pass through `passing`, for a stream that is used for
    something else too."""

    def __init__(self):
        self._digest = hashlib.sha256()

    def passing(self, post_ids: Iterable[str]) -> Iterator[str]:
        for post_id in post_ids:
            self._digest.update(post_id.encode('utf-8') + b'\n')
            yield post_id

    def hexdigest(self) -> str:
        return self._digest.hexdigest()[:16]


def array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class HeadLabels:
    """The labels of one head for every post of the store."""

    name: str
    kind: str
    k: int
    ids: np.ndarray                    # int32; per comment (comments) or per post (reactions)
    offsets: np.ndarray | None = None  # int64 (num_posts + 1,), comments only

    @property
    def num_posts(self) -> int:
        return len(self.offsets) - 1 if self.kind == COMMENTS else len(self.ids)

    def mask(self) -> np.ndarray:
        """True where the post has this signal."""
        if self.kind == COMMENTS:
            return np.diff(self.offsets) > 0
        return self.ids >= 0

    def post_cluster_ids(self, post: int) -> np.ndarray:
        """The cluster ids of one post (a multiset for comments; empty when masked)."""
        if self.kind == COMMENTS:
            return self.ids[self.offsets[post]:self.offsets[post + 1]]
        return self.ids[post:post + 1] if self.ids[post] >= 0 else self.ids[:0]

    def soft_targets(self, posts: Sequence[int]) -> np.ndarray:
        """(len(posts), k) float32 distributions; all-zero rows where masked."""
        targets = np.zeros((len(posts), self.k), np.float32)
        for row, post in enumerate(posts):
            ids = self.post_cluster_ids(int(post))
            if len(ids):
                np.add.at(targets[row], ids, 1.0 / len(ids))
        return targets


def comment_head(k: int, num_posts: int, post_index: np.ndarray,
                 cluster_ids: np.ndarray) -> HeadLabels:
    """Groups per-comment cluster ids by post (comments of a post keep their order)."""
    post_index = np.asarray(post_index, np.int64)
    if len(post_index) and (post_index.min() < 0 or post_index.max() >= num_posts):
        raise InputError(f'comment post indices out of range for {num_posts} posts')
    order = np.argsort(post_index, kind='stable')
    counts = np.bincount(post_index, minlength=num_posts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return HeadLabels(head_name(COMMENTS, k), COMMENTS, k,
                      np.asarray(cluster_ids, np.int32)[order], offsets)


def reaction_head(k: int, has_signal: np.ndarray, cluster_ids: np.ndarray) -> HeadLabels:
    """Scatters the cluster ids of the posts with reactions into a per-post array (-1 elsewhere)."""
    ids = np.full(len(has_signal), -1, np.int32)
    ids[np.asarray(has_signal, bool)] = cluster_ids
    return HeadLabels(head_name(REACTIONS, k), REACTIONS, k, ids)


def class_head(column: str, post_ids: Sequence[str], classes_of: dict[str, str],
               where: str) -> tuple[HeadLabels, list[str]]:
    """One known class per post (a CSV column), classes in sorted order; '' = masked.

    Every post must have a row: a missing one is an error naming `where`, not a silent mask.
    """
    missing = [post for post in post_ids if post not in classes_of]
    if missing:
        raise InputError(f'{where}: no row for {len(missing)} of {len(post_ids)} posts '
                         f'(first: {missing[0]!r})')
    values = [classes_of[post] for post in post_ids]
    classes = sorted({value for value in values if value})
    if len(classes) < 2:
        raise InputError(f'{where}: column {column!r} has {len(classes)} distinct classes; '
                         'a classification head needs at least 2')
    code = {name: i for i, name in enumerate(classes)}
    ids = np.array([code[value] if value else -1 for value in values], np.int32)
    k = len(classes)
    return HeadLabels(head_name(column, k), CLASSES, k, ids), classes


def reaction_features(counts: np.ndarray, log_total: bool,
                      log_total_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reaction counts (N, types) -> (features, has_signal).

    Features are the normalised count distribution, plus optionally log(1 + total) divided by
    the largest such value (`log_total_scale`, when the counts are a batch of all the posts),
    so popularity weighs about as much as one reaction type.
    """
    counts = np.asarray(counts, np.float64)
    total = counts.sum(axis=1)
    has_signal = total > 0
    features = counts / np.maximum(total, 1.0)[:, None]
    if log_total:
        log_totals = np.log1p(total)
        scale = log_totals.max(initial=0.0) if log_total_scale is None else log_total_scale
        features = np.concatenate([features, (log_totals / max(scale, 1e-12))[:, None]], axis=1)
    return features.astype(np.float32), has_signal


def save_head(directory: Path, head: HeadLabels) -> None:
    """Writes `<head>/ids.npy` (and `<head>/offsets.npy` for a comment head), each atomically."""
    head_dir = Path(directory) / head.name
    if head.offsets is not None:
        _save_array(head_dir / OFFSETS_FILE, np.asarray(head.offsets, np.int64))
    _save_array(head_dir / IDS_FILE, np.asarray(head.ids, np.int32))


def _save_array(path: Path, array: np.ndarray) -> None:
    with artifacts.atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.save(f, array, allow_pickle=False)


class ArrayWriter:
    """A 1-D .npy file of `length` items written in pieces (np.save's bytes), holding none of
    them. Use as a context manager: the file is renamed into place when the block ends
    normally, after checking that `length` items came, and removed if it raises."""

    def __init__(self, path: str | os.PathLike, dtype, length: int):
        self.path, self.dtype, self.length = Path(path), np.dtype(dtype), length
        self.written = 0
        self._stack = contextlib.ExitStack()
        self._file = None

    def __enter__(self) -> ArrayWriter:
        tmp = self._stack.enter_context(artifacts.atomic_path(self.path))
        self._file = self._stack.enter_context(open(tmp, 'wb'))
        np.lib.format.write_array_header_1_0(self._file, {
            'descr': np.lib.format.dtype_to_descr(self.dtype), 'fortran_order': False,
            'shape': (self.length,)})
        return self

    def write(self, values: np.ndarray) -> None:
        values = np.asarray(values, self.dtype)
        if self.written + len(values) > self.length:
            raise InputError(f'{self.path}: more than the {self.length} items announced')
        self._file.write(values.tobytes())
        self.written += len(values)

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is None and self.written != self.length:
            error = RuntimeError(f'{self.path}: {self.written} items written, '
                                 f'{self.length} announced')
            self._stack.__exit__(RuntimeError, error, None)
            raise error
        return self._stack.__exit__(exc_type, exc, traceback)


def load_head(directory: Path, name: str, meta: dict[str, Any]) -> HeadLabels:
    """The head's arrays memory-mapped (read-only np.memmap): nothing is read until used."""
    head_dir = Path(directory) / name
    files = [IDS_FILE] + ([OFFSETS_FILE] if meta['kind'] == COMMENTS else [])
    missing = [f for f in files if not (head_dir / f).exists()]
    if missing:
        raise InputError(f'{head_dir}: no {", ".join(missing)} (labels of an older version or '
                         'an incomplete directory); rerun the cluster stage')
    offsets = (np.load(head_dir / OFFSETS_FILE, mmap_mode='r')
               if meta['kind'] == COMMENTS else None)
    return HeadLabels(name, meta['kind'], meta['k'], np.load(head_dir / IDS_FILE, mmap_mode='r'),
                      offsets)


class CommentLabelsWriter:
    """Writes a comment head's `offsets.npy` and `ids.npy` from comment rows in store order,
    one batch (an embeddings shard) at a time: the files `comment_head` + `save_head` would
    write, holding no more than one batch. A post's rows may continue into the next batch.

    Use as a context manager: the files are renamed into place when the block ends normally
    (after checking that `num_rows` rows came), and removed if it raises.
    """

    def __init__(self, directory: str | os.PathLike, k: int, num_posts: int, num_rows: int):
        self.name = head_name(COMMENTS, k)
        self.k, self.num_posts, self.num_rows = k, num_posts, num_rows
        self._stack = contextlib.ExitStack()
        head_dir = Path(directory) / self.name
        self._offsets = self._stack.enter_context(
            ArrayWriter(head_dir / OFFSETS_FILE, np.int64, num_posts + 1))
        self._ids = self._stack.enter_context(ArrayWriter(head_dir / IDS_FILE, np.int32,
                                                          num_rows))
        self._rows = 0        # rows written so far
        self._next_post = 0   # the first post whose offset is not written yet
        self._last_post = 0   # the post of the last row written

    def add(self, post_index: np.ndarray, cluster_ids: np.ndarray) -> None:
        """The next rows: their posts (non-decreasing, from where the last batch ended) and ids."""
        post_index = np.asarray(post_index, np.int64)
        cluster_ids = np.asarray(cluster_ids)
        if post_index.shape != cluster_ids.shape or post_index.ndim != 1:
            raise ValueError(f'{self.name}: {post_index.shape} posts for {cluster_ids.shape} ids')
        if not len(post_index):
            return
        if (post_index[0] < self._last_post or post_index[-1] >= self.num_posts
                or (np.diff(post_index) < 0).any()):
            raise InputError(f'{self.name}: comment rows are not in post order (rows from '
                             f'{self._rows}: posts {post_index[0]}..{post_index[-1]} after post '
                             f'{self._last_post}, of {self.num_posts}); rerun the embed stage')
        if cluster_ids.min() < 0 or cluster_ids.max() >= self.k:
            raise InputError(f'{self.name}: cluster ids outside [0, {self.k})')
        if self._rows + len(post_index) > self.num_rows:
            raise InputError(f'{self.name}: more than the {self.num_rows} rows announced')
        self._write_offsets(int(post_index[-1]) + 1, post_index)
        self._ids.write(cluster_ids)
        self._rows += len(post_index)
        self._last_post = int(post_index[-1])

    def _write_offsets(self, stop: int, post_index: np.ndarray) -> None:
        """Offsets of posts [next_post, stop): the first row of this batch at or after each."""
        for first in range(self._next_post, stop, _OFFSET_BLOCK):
            posts = np.arange(first, min(stop, first + _OFFSET_BLOCK), dtype=np.int64)
            offsets = self._rows + np.searchsorted(post_index, posts, side='left')
            self._offsets.write(offsets)
        self._next_post = max(self._next_post, stop)

    def __enter__(self) -> CommentLabelsWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is None:
            try:
                if self._rows != self.num_rows:
                    raise RuntimeError(f'{self.name}: {self._rows} rows written, '
                                       f'{self.num_rows} announced')
                # The posts after the last row (and the end): offset = every row.
                self._write_offsets(self.num_posts + 1, np.zeros(0, np.int64))
            except BaseException as e:
                self._stack.__exit__(type(e), e, e.__traceback__)
                raise
        return self._stack.__exit__(exc_type, exc, traceback)


def write_index(directory: Path, num_posts: int, post_digest: str,
                heads: dict[str, dict[str, Any]]) -> None:
    artifacts.atomic_write_json(directory / LABELS_INDEX, {
        'version': LABELS_VERSION, 'num_posts': num_posts, 'post_ids_digest': post_digest,
        'heads': heads})


class LabelStore:
    """The labels of every head, aligned with a posts store."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / LABELS_INDEX
        if not (self.directory / artifacts.STAGE_RECORD).exists() or not index_path.exists():
            raise InputError(f'{self.directory} holds no finished labels; run the cluster stage')
        self.index = artifacts.read_json(index_path)
        if self.index.get('version') != LABELS_VERSION:
            raise InputError(f'{index_path}: labels version {self.index.get("version")}, this '
                             f'code reads version {LABELS_VERSION}; rerun the cluster stage')
        self._heads: dict[str, HeadLabels] = {}

    @property
    def num_posts(self) -> int:
        return self.index['num_posts']

    @property
    def head_names(self) -> list[str]:
        return list(self.index['heads'])

    def head_info(self, name: str) -> dict[str, Any]:
        if name not in self.index['heads']:
            raise InputError(f'no head {name!r} in {self.directory}; heads: {self.head_names}')
        return self.index['heads'][name]

    def head(self, name: str) -> HeadLabels:
        """The head's labels, memory-mapped (loaded once per store object)."""
        if name not in self._heads:
            self._heads[name] = load_head(self.directory, name, self.head_info(name))
        return self._heads[name]

    def check_aligned(self, post_ids: Iterable[str]) -> None:
        """Raises unless these labels were made for exactly this sequence of posts."""
        self.check_digest(post_ids_digest(post_ids))

    def check_digest(self, digest: str) -> None:
        """`check_aligned` for posts whose `post_ids_digest` is already known."""
        if digest != self.index['post_ids_digest']:
            raise InputError(f'{self.directory}: labels were made for other posts than these '
                             '(post id digest differs); rerun the cluster stage')


def parse_class_spec(spec: str) -> tuple[Path, str]:
    """config.experiment.supervised_labels 'CSV:COLUMN' -> (path, column); the CSV must exist."""
    path, column = parse_pair(spec, 'config.experiment.supervised_labels', expected='CSV:COLUMN',
                              last=True)
    if not Path(path).is_file():
        raise InputError(f'{path}: no such file (config.experiment.supervised_labels)')
    return Path(path), column


def write_class_labels(out: Path, csv_path: Path, column: str,
                       post_ids: Sequence[str]) -> dict[str, Any]:
    """A label store with one class head from `column` of a CSV keyed by 'id' (rows of posts)."""
    with open(csv_path, newline='', encoding='utf-8') as f:
        reader = csv.DictReader(f)
        if 'id' not in (reader.fieldnames or []) or column not in reader.fieldnames:
            raise InputError(f'{csv_path}: needs columns id and {column!r}, '
                             f'has {reader.fieldnames}')
        classes_of = {row['id']: row[column].strip() for row in reader}
    head, classes = class_head(column, post_ids, classes_of, str(csv_path))
    save_head(out, head)
    info = {'kind': head.kind, 'k': head.k, 'classes': classes, 'source': f'{csv_path}:{column}'}
    write_index(out, head.num_posts, post_ids_digest(post_ids), {head.name: info})
    return {'heads': {head.name: info}, 'posts_with_class': int(head.mask().sum())}
