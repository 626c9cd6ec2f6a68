"""Per-batch training targets from the label store, in fixed shapes.

Every head gives `{'ids': int32 [B, M], 'probs': float32 [B, M]}`:

* comment heads (M = max_targets): the post's distinct comment clusters, most frequent first
  (ties by smaller id), probs = count / total, so the row is the soft target distribution. A post
  with more than M distinct clusters keeps the M most frequent, renormalised.
* reaction heads (M = 1): ids = [cluster], probs = [1.0].

Unused slots have id 0 and prob 0; a post without the signal, or a padding row (index -1), has
all-zero probs, which the loss reads as masked. Shapes never depend on the data, so nothing
recompiles. Everything is computed per batch with array operations on the CSR label arrays,
which are memory-mapped (labels.load_head): a batch reads the pages of its own posts' offsets and
ids, so a process's resident memory does not grow with the number of posts, and the processes
and Grain workers of a host share one copy in the page cache. Nothing per post is precomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from vise_jax.cluster import labels as labels_lib
from vise_jax.errors import InputError


class HeadSpec(NamedTuple):
    """What the model needs to know of a head: its kind, its K, and M target slots."""

    kind: str
    k: int
    max_targets: int


def head_specs(label_store: labels_lib.LabelStore, names: tuple[str, ...],
               max_targets: int) -> dict[str, HeadSpec]:
    if max_targets < 1:
        raise InputError(f'input.max_targets_per_post must be positive, got {max_targets}')
    specs = {}
    for name in names or label_store.head_names:
        info = label_store.head_info(name)
        slots = max_targets if info['kind'] == labels_lib.COMMENTS else 1
        specs[name] = HeadSpec(info['kind'], int(info['k']), slots)
    if not specs:
        raise InputError(f'{label_store.directory} has no heads to train')
    return specs


def comment_targets(offsets: np.ndarray, cluster_ids: np.ndarray, k: int, posts: np.ndarray,
                    max_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft targets of a comment head for `posts` (-1 = padding, all-zero row)."""
    posts = np.asarray(posts, np.int64)
    rows = len(posts)
    valid = posts >= 0
    starts = np.where(valid, offsets[np.maximum(posts, 0)], 0)
    lengths = np.where(valid, offsets[np.maximum(posts, 0) + 1], 0) - starts
    # Gather every comment id of the batch's posts, tagged with its row.
    row_of = np.repeat(np.arange(rows), lengths)
    first = np.cumsum(lengths) - lengths
    gathered = cluster_ids[np.repeat(starts - first, lengths) + np.arange(lengths.sum())]
    keys, counts = np.unique(row_of * k + gathered.astype(np.int64), return_counts=True)
    key_rows, key_ids = keys // k, keys % k
    # Within each row: most frequent first, ties by id.
    order = np.lexsort((key_ids, -counts, key_rows))
    key_rows, key_ids, counts = key_rows[order], key_ids[order], counts[order]
    rank = np.arange(len(key_rows)) - np.searchsorted(key_rows, key_rows, side='left')
    kept = rank < max_targets
    ids = np.zeros((rows, max_targets), np.int32)
    probs = np.zeros((rows, max_targets), np.float32)
    ids[key_rows[kept], rank[kept]] = key_ids[kept]
    probs[key_rows[kept], rank[kept]] = counts[kept]
    totals = probs.sum(axis=1, keepdims=True)
    np.divide(probs, totals, out=probs, where=totals > 0)
    return ids, probs


def reaction_targets(post_clusters: np.ndarray, posts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[B, 1] targets of a reaction head (cluster -1 in the store = no reactions = masked)."""
    posts = np.asarray(posts, np.int64)
    clusters = np.where(posts >= 0, post_clusters[np.maximum(posts, 0)], -1)
    has_signal = clusters >= 0
    return (np.where(has_signal, clusters, 0).astype(np.int32)[:, None],
            has_signal.astype(np.float32)[:, None])


class PostTargets:
    """Callable: post indices -> {'targets': {head: {'ids', 'probs'}}}.

    Pickles as the label directory and head specs; each process (Grain worker) memory-maps the
    label arrays on first use, so a worker starts without copying them through a pipe and reads
    only the parts its batches touch.
    """

    def __init__(self, labels_dir: str | Path, heads: dict[str, HeadSpec]):
        self.labels_dir = str(labels_dir)
        self.heads = dict(heads)
        self._labels: dict[str, labels_lib.HeadLabels] | None = None

    def __getstate__(self):
        return {'labels_dir': self.labels_dir, 'heads': self.heads, '_labels': None}

    def _loaded(self) -> dict[str, labels_lib.HeadLabels]:
        if self._labels is None:
            store = labels_lib.LabelStore(self.labels_dir)
            self._labels = {name: store.head(name) for name in self.heads}
        return self._labels

    def __call__(self, posts: np.ndarray) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        targets = {}
        for name, head in self._loaded().items():
            if head.kind == labels_lib.COMMENTS:
                ids, probs = comment_targets(head.offsets, head.ids, head.k, posts,
                                             self.heads[name].max_targets)
            else:
                ids, probs = reaction_targets(head.ids, posts)
            targets[name] = {'ids': ids, 'probs': probs}
        return {'targets': targets}
