"""From comment embeddings and reaction counts to pseudo labels, centroids and the report.

Comments: for each K, k-means (cosine) fitted on one sample of the embeddings (drawn once for all
Ks; the centroids are saved as soon as they are fitted). Then one streamed pass over the
embedding shards assigns every comment to every pending K: each shard is read once and assigned
against each K's centroids, its ids are appended to each head's label files
(labels.CommentLabelsWriter) and the report's figures accumulate: cluster sizes, the comments
nearest each centroid (report.NearestMembers, a bounded candidate set) and the contingency
tables against known factors. Memory: one shard, the centroids and k * max(nearest_per_cluster,
report.EXAMPLE_CANDIDATES) candidates per head; never every comment's id or post.

Reactions: the per-post profile (labels.reaction_features) of the posts that have reactions;
for each K, k-means (euclidean) fitted on all of them or on a seeded sample of fit_sample
(drawn once for all Ks), then every post assigned in a streamed pass over the store, its ids
written as they come (labels.ArrayWriter). Memory: the sample and one batch of posts.

The posts store's metadata is streamed: once for the post-id digest the labels are aligned
with (and, with cluster.latents, the post ids); with reaction heads, once for the features'
scale, once for their sample and once per reaction K. The texts of the nearest comments are
read by random access (k * nearest_per_cluster posts per head).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections
import numpy as np
import tqdm

from vise_jax import artifacts
from vise_jax.cluster import kmeans, labels, report
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
    def from_config(cls, config: ml_collections.ConfigDict) -> ClusterSettings:
        c = config.cluster
        return cls(tuple(c.comment_ks), tuple(c.reaction_ks), c.fit_sample, c.init, c.max_iters,
                   c.tol, c.reaction_log_total, c.nearest_per_cluster,
                   c.latents, config.seed, c.matmul_precision)

    def kmeans_options(self, k: int, metric: str) -> kmeans.KMeansOptions:
        return kmeans.KMeansOptions(k=k, metric=metric, max_iters=self.max_iters, tol=self.tol,
                                    init=self.init, seed=self.seed,
                                    matmul_precision=self.matmul_precision)


def make_labels(store: PostsStore, shards: EmbeddingShards, out: Path,
                settings: ClusterSettings, mesh=None) -> dict[str, Any]:
    """Writes <head>/ (label arrays), centroids, labels.json and report/ into `out`; returns a
    summary."""
    comment_heads = {labels.head_name(labels.COMMENTS, k): k for k in settings.comment_ks}
    reaction_heads = {labels.head_name(labels.REACTIONS, k): k for k in settings.reaction_ks}
    # Each finished head is committed (its heads/<head>.json last), so an interrupted stage
    # resumes at the first unfinished one.
    pending = {name for name in [*comment_heads, *reaction_heads]
               if not _head_record(out, name).exists()}
    posts = _read_posts(store, reactions=bool(pending & set(reaction_heads)),
                        ids=bool(settings.latents and pending))
    latents = _read_latents(settings.latents, posts.ids) if posts.ids is not None else {}
    records = {}
    comments_todo = {name: k for name, k in comment_heads.items() if name in pending}
    if comments_todo:
        centroids = _comment_centroids(comments_todo, shards, out, settings, mesh)
        passes = assign_comment_heads(shards, centroids, out, posts.num_posts, settings, latents,
                                      mesh)
        for name, k in comments_todo.items():
            summary = _comment_head(name, k, passes[name], store, settings.nearest_per_cluster)
            records[name] = _commit(out, name, labels.COMMENTS, k, centroids[name], summary,
                                    settings, shards, mesh)
    sample = None   # shared by every reaction K
    for name, k in reaction_heads.items():
        if name in pending:
            if sample is None:
                sample = _reaction_sample(store, posts.reactions, settings)
            summary, centroids = _reaction_head(k, sample, store, posts.reactions, out,
                                                settings, latents, mesh)
            records[name] = _commit(out, name, labels.REACTIONS, k, centroids, summary, settings,
                                    shards, mesh)
    heads_index, summaries = {}, []
    for name in [*comment_heads, *reaction_heads]:
        record = records.get(name) or artifacts.read_json(_head_record(out, name))
        heads_index[name] = record['info']
        summaries.append(report.HeadSummary.from_json(record['summary']))
    labels.write_index(out, posts.num_posts, posts.digest, heads_index)
    return {'heads': heads_index,
            'report': report.write_report(out, summaries, store.reaction_types,
                                          store.image_bytes)}


def _head_record(out: Path, name: str) -> Path:
    return out / 'heads' / f'{name}.json'


def _centroids_path(out: Path, name: str) -> Path:
    return out / 'centroids' / f'{name}.npy'


def _commit(out: Path, name: str, kind: str, k: int, centroids: np.ndarray,
            summary: report.HeadSummary, settings: ClusterSettings, shards: EmbeddingShards,
            mesh) -> dict[str, Any]:
    """Saves the centroids, then the head's record (its completion mark); returns the record."""
    info = {'kind': kind, 'k': k, 'centroid_hash': labels.array_digest(centroids),
            'matmul_precision': kmeans.resolve_matmul_precision(settings.matmul_precision, mesh)}
    info.update({'encoder': shards.encoder} if kind == labels.COMMENTS
                else {'log_total': settings.reaction_log_total})
    _save_centroids(out, name, centroids)
    record = {'info': info, 'summary': summary.to_json()}
    artifacts.atomic_write_json(_head_record(out, name), record)
    return record


def _save_centroids(out: Path, name: str, centroids: np.ndarray) -> None:
    with artifacts.atomic_path(_centroids_path(out, name)) as tmp, open(tmp, 'wb') as f:
        np.save(f, centroids)


class _Posts(NamedTuple):
    num_posts: int
    digest: str                          # labels.post_ids_digest of the store's posts
    reactions: _ReactionScale | None     # when asked for
    ids: list[str] | None                # the post ids, when asked for


class _ReactionScale(NamedTuple):
    """What the reaction features of any post need from a pass over all of them."""
    with_signal: int          # posts with at least one reaction
    max_log_total: float      # the largest log(1 + total): the popularity feature's scale


_POSTS_PER_BATCH = 65_536   # reaction rows are read, featurised and assigned this many at a time


def _read_posts(store: PostsStore, *, reactions: bool, ids: bool) -> _Posts:
    """Streamed passes over the store's metadata; keeps only what is asked for."""
    kept_ids: list[str] | None = [] if ids else None

    def each_id():
        for post in store.iter_meta():
            if kept_ids is not None:
                kept_ids.append(post.id)
            yield post.id

    digest = labels.post_ids_digest(each_id())
    return _Posts(len(store), digest, _reaction_scale(store) if reactions else None, kept_ids)


def _count_batches(store: PostsStore):
    """The posts' reaction counts in store order, (posts, reaction types) float64 arrays of
    _POSTS_PER_BATCH posts at a time."""
    batch = []
    for post in store.iter_meta():
        batch.append([post.reactions[t] for t in store.reaction_types])
        if len(batch) == _POSTS_PER_BATCH:
            yield np.asarray(batch, np.float64)
            batch = []
    if batch:
        yield np.asarray(batch, np.float64)


def _reaction_scale(store: PostsStore) -> _ReactionScale:
    with_signal, max_log_total = 0, 0.0
    for counts in _count_batches(store):
        totals = counts.sum(axis=1)
        with_signal += int((totals > 0).sum())
        max_log_total = max(max_log_total, float(np.log1p(totals).max()))
    return _ReactionScale(with_signal, max_log_total)


def _reaction_batches(store: PostsStore, scale: _ReactionScale, log_total: bool):
    """The posts' reaction features in store order, a batch at a time: (index of the batch's
    first post, features of its posts with reactions (rows, features), has_signal (posts,))."""
    start = 0
    for counts in _count_batches(store):
        features, has_signal = labels.reaction_features(counts, log_total,
                                                        log_total_scale=scale.max_log_total)
        yield start, features[has_signal], has_signal
        start += len(counts)


def _reaction_sample(store: PostsStore, scale: _ReactionScale,
                     settings: ClusterSettings) -> np.ndarray:
    """The reaction features k-means is fitted on: every post with reactions, or a seeded
    sample of fit_sample of them (in store order), shared by every reaction K."""
    if scale.with_signal == 0:
        raise InputError('cluster: no post has reactions; drop cluster.reaction_ks')
    chosen = np.arange(scale.with_signal)
    if scale.with_signal > settings.fit_sample:
        chosen = np.sort(np.random.default_rng(settings.seed).choice(
            scale.with_signal, settings.fit_sample, replace=False))
    parts, row = [], 0     # row: the number of the batch's first row with reactions
    for _, rows, _ in _reaction_batches(store, scale, settings.reaction_log_total):
        picked = chosen[np.searchsorted(chosen, row):np.searchsorted(chosen, row + len(rows))]
        parts.append(rows[picked - row])
        row += len(rows)
    return np.concatenate(parts)


def _comment_centroids(heads: dict[str, int], shards: EmbeddingShards, out: Path,
                       settings: ClusterSettings, mesh) -> dict[str, np.ndarray]:
    """Each head's centroids: fitted on one sample shared by every K, saved at once (a resumed
    stage reuses them), or read back when an interrupted run saved them."""
    centroids, sample = {}, None
    for name, k in heads.items():
        path = _centroids_path(out, name)
        if path.exists():
            centroids[name] = np.load(path)
            continue
        if sample is None:
            sample = shards.sample(settings.fit_sample, seed=settings.seed)
        centroids[name] = _fit(name, sample, settings.kmeans_options(k, 'cosine'), mesh).centroids
        _save_centroids(out, name, centroids[name])
    return centroids


@dataclasses.dataclass
class CommentPass:
    """What the assignment pass gathers for one comment head, besides its label files."""

    sizes: np.ndarray                          # (k,) comments per cluster
    nearest: report.NearestMembers             # payload: (post_index, comment_number)
    contingency: dict[str, np.ndarray]         # per known factor, (classes, k) counts


def assign_comment_heads(shards: EmbeddingShards, centroids: dict[str, np.ndarray], out: Path,
                         num_posts: int, settings: ClusterSettings,
                         latents: dict[str, np.ndarray], mesh=None) -> dict[str, CommentPass]:
    """Assigns every comment to every head's centroids in one pass over the embeddings.

    Each shard is read once; its ids go to `<head>/ids.npy` and `<head>/offsets.npy` (written
    shard by shard, renamed into place when the pass ends) and into the returned figures.
    """
    passes = {name: CommentPass(
        np.zeros(len(c), np.int64),
        # Enough nearest comments for the texts and for the contact sheet's distinct posts.
        report.NearestMembers(
            len(c), max(settings.nearest_per_cluster, report.EXAMPLE_CANDIDATES), 2),
        {factor: np.zeros((int(truth.max(initial=-1)) + 1, len(c)), np.int64)
         for factor, truth in latents.items()})
        for name, c in centroids.items()}
    with contextlib.ExitStack() as stack:
        writers = {name: stack.enter_context(
            labels.CommentLabelsWriter(out, len(c), num_posts, len(shards)))
            for name, c in centroids.items()}
        bar = stack.enter_context(tqdm.tqdm(total=len(shards), unit='comment', unit_scale=True,
                                            desc=f'assign ({len(centroids)} Ks)'))
        for number in range(shards.num_shards):
            embeddings, post_index, comment_number = shards.shard(number)
            if not len(post_index):
                continue
            embeddings = np.asarray(embeddings)   # the one read of this shard
            payload = np.stack([post_index, comment_number], axis=1)
            for name, head_centroids in centroids.items():
                ids, distances = kmeans.assign([embeddings], head_centroids, metric='cosine',
                                               mesh=mesh,
                                               matmul_precision=settings.matmul_precision)
                writers[name].add(post_index, ids)
                found = passes[name]
                found.sizes += np.bincount(ids, minlength=len(head_centroids))
                found.nearest.add(ids, distances, payload)
                for factor, truth in latents.items():
                    found.contingency[factor] += report.contingency(
                        ids, truth[post_index], *found.contingency[factor].shape)
            bar.update(len(post_index))
    return passes


def _comment_head(name: str, k: int, found: CommentPass, store: PostsStore,
                  texts_per_cluster: int) -> report.HeadSummary:
    """The report's figures of one assigned comment head: its nearest comments' texts and, for
    the contact sheet, the distinct posts of its nearest comments."""
    members = found.nearest.members()
    shown = [m[:texts_per_cluster] for m in members]   # only these posts' metadata is read
    posts = np.unique(np.concatenate([m[:, 0] for m in shown] + [np.zeros(0, np.int64)]))
    metas = dict(zip(posts.tolist(), store.meta_many(posts.tolist()), strict=True))
    nearest = [[metas[int(post)].comments[int(number)] for post, number in cluster]
               for cluster in shown]
    return report.HeadSummary(
        name, labels.COMMENTS, k, found.sizes, nearest_texts=nearest,
        example_posts=[report.example_posts(m[:, 0]) for m in members],
        agreement={factor: report.agreement_from_contingency(counts)
                   for factor, counts in found.contingency.items()})


def _reaction_head(k: int, sample: np.ndarray, store: PostsStore, scale: _ReactionScale,
                   out: Path, settings: ClusterSettings, latents: dict[str, np.ndarray], mesh
                   ) -> tuple[report.HeadSummary, np.ndarray]:
    """Fits k-means on the sample, then assigns every post with reactions in one streamed pass
    over the store, writing `<head>/ids.npy` (-1 for the posts without) as it goes."""
    name = labels.head_name(labels.REACTIONS, k)
    centroids = _fit(name, sample, settings.kmeans_options(k, 'euclidean'), mesh).centroids
    num_types = len(store.reaction_types)
    sizes = np.zeros(k, np.int64)
    sums = np.zeros((k, num_types), np.float32)
    nearest = report.NearestMembers(k, report.EXAMPLES_PER_CLUSTER, 1)
    counts = {factor: np.zeros((int(truth.max(initial=-1)) + 1, k), np.int64)
              for factor, truth in latents.items()}
    with labels.ArrayWriter(out / name / labels.IDS_FILE, np.int32, len(store)) as writer:
        for start, rows, has_signal in _reaction_batches(store, scale,
                                                         settings.reaction_log_total):
            post_ids = np.full(len(has_signal), -1, np.int32)
            if len(rows):
                ids, distances = kmeans.assign(rows, centroids, mesh=mesh,
                                               matmul_precision=settings.matmul_precision)
                post_ids[has_signal] = ids
                posts = start + np.flatnonzero(has_signal)
                sizes += np.bincount(ids, minlength=k)
                np.add.at(sums, ids, rows[:, :num_types])
                nearest.add(ids, distances, posts[:, None])
                for factor, truth in latents.items():
                    counts[factor] += report.contingency(ids, truth[posts], *counts[factor].shape)
            writer.write(post_ids)
    sums /= np.maximum(sizes, 1)[:, None]      # the mean profile of each cluster
    summary = report.HeadSummary(
        name, labels.REACTIONS, k, sizes, mean_profiles=sums,
        example_posts=[members[:, 0].tolist() for members in nearest.members()],
        agreement={factor: report.agreement_from_contingency(table)
                   for factor, table in counts.items()})
    return summary, centroids


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
