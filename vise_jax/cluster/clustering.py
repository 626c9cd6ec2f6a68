"""From comment embeddings and reaction counts to pseudo labels, centroids and the report.

Comments: k-means (cosine) fitted on a sample of the embeddings for each K, then every comment
assigned in streaming batches. Reactions: the per-post profile (labels.reaction_features)
clustered for each K over the posts that have reactions.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from vise_jax import artifacts
from vise_jax.cluster import kmeans, labels, report
from vise_jax.configlib import expand_workdir
from vise_jax.errors import InputError
from vise_jax.posts import PostsStore
from vise_jax.text import EmbeddingShards


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    comment_ks: tuple[int, ...]
    reaction_ks: tuple[int, ...]
    fit_sample: int
    init: str
    max_iters: int
    tol: float
    reaction_log_total: bool
    nearest_per_cluster: int
    latents: str   # '' or a CSV with an 'id' column and one column per known factor
    seed: int
    matmul_precision: str = kmeans.FLOAT32

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, workdir: Path) -> ClusterSettings:
        c = config.cluster
        return cls(tuple(c.comment_ks), tuple(c.reaction_ks), c.fit_sample, c.init, c.max_iters,
                   c.tol, c.reaction_log_total, c.nearest_per_cluster,
                   expand_workdir(c.latents, workdir), config.seed, c.matmul_precision)

    def kmeans_options(self, k: int, metric: str) -> kmeans.KMeansOptions:
        return kmeans.KMeansOptions(k=k, metric=metric, max_iters=self.max_iters, tol=self.tol,
                                    init=self.init, seed=self.seed,
                                    matmul_precision=self.matmul_precision)


def make_labels(store: PostsStore, shards: EmbeddingShards, out: Path,
                settings: ClusterSettings, mesh=None) -> dict[str, Any]:
    """Writes <head>.npz, centroids, labels.json and report/ into `out`; returns a summary."""
    metas = list(store.iter_meta())
    latents = _read_latents(settings.latents, [m.id for m in metas])
    # Inputs shared by every K, read once (and only when a head still has to be made).
    comments = functools.cache(lambda: _CommentRows(shards.post_index(), shards.comment_number()))
    reactions = functools.cache(lambda: _reaction_rows(metas, store.reaction_types, settings))
    heads_index, summaries = {}, []
    work = [(labels.head_name(labels.COMMENTS, k),
             lambda k=k: _comment_head(k, metas, shards, comments(), settings, latents, mesh))
            for k in settings.comment_ks]
    work += [(labels.head_name(labels.REACTIONS, k),
              lambda k=k: _reaction_head(k, reactions(), len(store.reaction_types), settings,
                                         latents, mesh))
             for k in settings.reaction_ks]
    for name, make_head in work:
        # Each finished head is committed (its .json last), so an interrupted stage resumes here.
        if not _head_record(out, name).exists():
            head, summary, centroids = make_head()
            info = {'kind': head.kind, 'k': head.k,
                    'centroid_hash': labels.array_digest(centroids),
                    'matmul_precision': kmeans.resolve_matmul_precision(
                        settings.matmul_precision, mesh)}
            info.update({'encoder': shards.encoder} if head.kind == labels.COMMENTS
                        else {'log_total': settings.reaction_log_total})
            _save(out, head, centroids)
            artifacts.atomic_write_json(_head_record(out, name),
                                        {'info': info, 'summary': summary.to_json()})
        record = artifacts.read_json(_head_record(out, name))
        heads_index[name] = record['info']
        summaries.append(report.HeadSummary.from_json(record['summary']))
    labels.write_index(out, len(metas), labels.post_ids_digest(m.id for m in metas), heads_index)
    return {'heads': heads_index,
            'report': report.write_report(out, summaries, store.reaction_types)}


def _head_record(out: Path, name: str) -> Path:
    return out / 'heads' / f'{name}.json'


def _save(out: Path, head: labels.HeadLabels, centroids: np.ndarray) -> None:
    labels.save_head(out, head)
    (out / 'centroids').mkdir(exist_ok=True)
    with artifacts.atomic_path(out / 'centroids' / f'{head.name}.npy') as tmp, \
            open(tmp, 'wb') as f:
        np.save(f, centroids)


class _CommentRows(NamedTuple):
    post_index: np.ndarray       # per embedded comment, its post
    comment_number: np.ndarray   # and its position among that post's comments


class _ReactionRows(NamedTuple):
    features: np.ndarray         # (posts with reactions, features)
    has_signal: np.ndarray       # (posts,) bool


def _reaction_rows(metas, reaction_types, settings: ClusterSettings) -> _ReactionRows:
    counts = np.array([[m.reactions[t] for t in reaction_types] for m in metas], np.float64)
    features, has_signal = labels.reaction_features(counts, settings.reaction_log_total)
    return _ReactionRows(features[has_signal], has_signal)


def _comment_head(k, metas, shards, rows: _CommentRows, settings, latents, mesh):
    name = labels.head_name(labels.COMMENTS, k)
    result = _fit(name, shards.sample(settings.fit_sample, seed=settings.seed),
                  settings.kmeans_options(k, 'cosine'), mesh)
    ids, distances = kmeans.assign((embeddings for embeddings, _, _ in shards), result.centroids,
                                   metric='cosine', mesh=mesh,
                                   matmul_precision=settings.matmul_precision)
    post_index, comment_number = rows
    head = labels.comment_head(k, len(metas), post_index, ids)
    nearest = [[metas[post_index[j]].comments[comment_number[j]] for j in members]
               for members in report.nearest_members(ids, distances, k,
                                                     settings.nearest_per_cluster)]
    summary = report.HeadSummary(
        name, labels.COMMENTS, k, np.bincount(ids, minlength=k), nearest_texts=nearest,
        agreement={factor: report.agreement(ids, truth[post_index])
                   for factor, truth in latents.items()})
    return head, summary, result.centroids


def _reaction_head(k, rows: _ReactionRows, num_types: int, settings, latents, mesh):
    name = labels.head_name(labels.REACTIONS, k)
    features, has_signal = rows
    result = _fit(name, features, settings.kmeans_options(k, 'euclidean'), mesh)
    ids, _ = kmeans.assign(features, result.centroids, mesh=mesh,
                           matmul_precision=settings.matmul_precision)
    sizes = np.bincount(ids, minlength=k)
    profiles = np.zeros((k, num_types), np.float32)
    np.add.at(profiles, ids, features[:, :num_types])
    profiles /= np.maximum(sizes, 1)[:, None]
    summary = report.HeadSummary(
        name, labels.REACTIONS, k, sizes, mean_profiles=profiles,
        agreement={factor: report.agreement(ids, truth[has_signal])
                   for factor, truth in latents.items()})
    return labels.reaction_head(k, has_signal, ids), summary, result.centroids


def _fit(head: str, rows: np.ndarray, options: kmeans.KMeansOptions, mesh) -> kmeans.KMeansResult:
    try:
        return kmeans.fit(rows, options, mesh=mesh)
    except InputError as e:
        raise InputError(f'cluster: head {head}: {e}') from None


def _read_latents(path: str, post_ids: list[str]) -> dict[str, np.ndarray]:
    """Known factors per post (the demo world's), as integer codes aligned with post_ids."""
    if not path:
        return {}
    with open(path, newline='', encoding='utf-8') as f:
        rows = {row['id']: row for row in csv.DictReader(f)}
    missing = [i for i in post_ids if i not in rows]
    if missing:
        raise InputError(f'{path}: no row for {len(missing)} posts (first: {missing[0]!r})')
    factors = [name for name in next(iter(rows.values())) if name != 'id']
    codes = {}
    for factor in factors:
        values = [rows[i][factor] for i in post_ids]
        _, codes[factor] = np.unique(values, return_inverse=True)
    return codes
