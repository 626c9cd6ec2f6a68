"""The cluster report: what each cluster holds, for a person to read.

Per head: cluster sizes (table and PNG), for comment heads the comments nearest each centroid,
for reaction heads the mean reaction profile per cluster (table and heatmap PNG), a contact sheet
of example post images per cluster (PNG), and, where ground truth exists (the demo world's
latents), how well the clusters recover it.

K reaches thousands, so the tables and the contact sheet show only the CLUSTERS_LISTED largest
clusters, and say so; the sizes plot and heads/<head>.json hold every cluster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use('Agg')  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont, ImageOps  # noqa: E402
from sklearn import metrics  # noqa: E402

from vise_jax import artifacts  # noqa: E402
from vise_jax.cluster import labels  # noqa: E402
from vise_jax.posts import images  # noqa: E402

REPORT_DIR = 'report'
CLUSTERS_LISTED = 50  # the largest clusters get a row each; the sizes plot shows all
TEXT_CUT = 80         # characters of a comment shown in a table cell; heads/<head>.json has all

# The contact sheet: one row per listed cluster, a label then EXAMPLES_PER_CLUSTER cells.
EXAMPLES_PER_CLUSTER = 6
# Comments kept per cluster to find its example posts: a post's comments often fall in the same
# cluster, so more comments than examples are needed to find that many distinct posts.
EXAMPLE_CANDIDATES = 2 * EXAMPLES_PER_CLUSTER
THUMB = 64            # a cell's side in pixels; each image is fitted inside it
GAP = 4               # pixels after each cell, across and down
LABEL_WIDTH = 112     # the row label ('cluster 4999', its size) left of the cells
TITLE_HEIGHT = 18
PLACEHOLDER_GREY = (160, 160, 160)   # drawn where a post's image cannot be decoded
# Ingest refused larger images already; this only keeps a store written otherwise from making
# the report decode a decompression bomb.
MAX_PIXELS = 64_000_000


@dataclasses.dataclass
class HeadSummary:
    name: str
    kind: str
    k: int
    sizes: np.ndarray                                 # (k,) members per cluster
    nearest_texts: list[list[str]] | None = None      # comments nearest each centroid
    mean_profiles: np.ndarray | None = None           # (k, reaction types) mean distribution
    example_posts: list[list[int]] | None = None      # post indices to show, nearest first
    agreement: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        as_list = lambda a: None if a is None else np.asarray(a).tolist()  # noqa: E731
        return {**dataclasses.asdict(self), 'sizes': as_list(self.sizes),
                'mean_profiles': as_list(self.mean_profiles)}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> HeadSummary:
        profiles = record['mean_profiles']
        return cls(**{**record, 'sizes': np.asarray(record['sizes'], np.int64),
                      'mean_profiles': None if profiles is None
                      else np.asarray(profiles, np.float32)})


def nearest_members(cluster_ids: np.ndarray, distances: np.ndarray, k: int,
                    per_cluster: int) -> list[np.ndarray]:
    """For each cluster, the indices of its `per_cluster` members closest to the centroid."""
    order = np.lexsort((distances, cluster_ids))
    starts = np.searchsorted(cluster_ids[order], np.arange(k))
    ends = np.searchsorted(cluster_ids[order], np.arange(k), side='right')
    return [order[s:min(e, s + per_cluster)] for s, e in zip(starts, ends, strict=True)]


class NearestMembers:
    """`nearest_members` over rows that come in batches: at most k * per_cluster candidates.

    Each batch's rows carry a payload (e.g. their post and comment number); `members()` gives,
    per cluster, the payloads of the `per_cluster` rows nearest the centroid, ties going to the
    earlier row: what nearest_members picks on all rows at once.
    """

    def __init__(self, k: int, per_cluster: int, payload_width: int):
        self.k, self.per_cluster = k, per_cluster
        self._cluster = np.zeros(0, np.int64)
        self._distance = np.zeros(0, np.float32)
        self._payload = np.zeros((0, payload_width), np.int64)

    def add(self, cluster_ids: np.ndarray, distances: np.ndarray, payload: np.ndarray) -> None:
        chosen = np.concatenate(nearest_members(cluster_ids, distances, self.k,
                                                self.per_cluster) + [np.zeros(0, np.int64)])
        cluster = np.concatenate([self._cluster, np.asarray(cluster_ids, np.int64)[chosen]])
        distance = np.concatenate([self._distance, np.asarray(distances)[chosen]])
        payload = np.concatenate([self._payload, np.asarray(payload, np.int64)[chosen]])
        order = np.lexsort((distance, cluster))   # stable: earlier rows first among ties
        cluster, distance, payload = cluster[order], distance[order], payload[order]
        rank = np.arange(len(cluster)) - np.searchsorted(cluster, cluster, side='left')
        kept = rank < self.per_cluster
        self._cluster, self._distance, self._payload = cluster[kept], distance[kept], payload[kept]

    def members(self) -> list[np.ndarray]:
        """Per cluster, the (n, payload_width) payloads of its nearest rows, nearest first."""
        bounds = np.searchsorted(self._cluster, np.arange(self.k + 1))
        return [self._payload[bounds[c]:bounds[c + 1]] for c in range(self.k)]


def example_posts(post_indices: np.ndarray, limit: int = EXAMPLES_PER_CLUSTER) -> list[int]:
    """The first `limit` distinct posts among one cluster's members (given nearest first)."""
    post_indices = np.asarray(post_indices, np.int64)
    _, first = np.unique(post_indices, return_index=True)
    return post_indices[np.sort(first)][:limit].tolist()


def agreement(cluster_ids: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """How well clusters recover a known factor: NMI, and purity (majority class share)."""
    return agreement_from_contingency(metrics.cluster.contingency_matrix(truth, cluster_ids))


def contingency(cluster_ids: np.ndarray, truth: np.ndarray, num_classes: int,
                k: int) -> np.ndarray:
    """(num_classes, k) counts of (known class, cluster) pairs; sums over batches of rows."""
    pairs = np.asarray(truth, np.int64) * k + np.asarray(cluster_ids, np.int64)
    return np.bincount(pairs, minlength=num_classes * k).reshape(num_classes, k)


def agreement_from_contingency(counts: np.ndarray) -> dict[str, float]:
    """`agreement` from a (classes, clusters) contingency table, e.g. summed over batches.

    NMI as scikit-learn's normalized_mutual_info_score (arithmetic mean of the entropies);
    classes and clusters without a member play no part.
    """
    counts = np.asarray(counts)
    counts = counts[counts.sum(axis=1) > 0][:, counts.sum(axis=0) > 0].astype(np.float64)
    if counts.shape[0] == counts.shape[1] <= 1:
        nmi = 1.0   # neither labelling splits the rows: a perfect match, as scikit-learn says
    else:
        mi = metrics.mutual_info_score(None, None, contingency=counts)
        entropies = [_entropy(counts.sum(axis=axis)) for axis in (1, 0)]
        nmi = 0.0 if mi == 0 else float(mi / np.mean(entropies))
    total = counts.sum()
    return {'nmi': nmi,
            'purity': float(counts.max(axis=0).sum() / total) if total else 0.0}


def _entropy(counts: np.ndarray) -> float:
    """scikit-learn's clustering entropy (natural log) from per-label counts."""
    counts = counts[counts > 0]
    total = counts.sum()
    return float(-np.sum((counts / total) * (np.log(counts) - np.log(total))))


def write_report(directory: Path, heads: Sequence[HeadSummary], reaction_types: Sequence[str],
                 image_bytes: Callable[[int], bytes] | None = None) -> dict[str, Any]:
    """Writes report.md, one PNG per plot, and report.json; returns the JSON summary.

    `image_bytes(post_index)` gives a post's encoded image (PostsStore.image_bytes); with it,
    each head that recorded example posts gets a contact sheet.
    """
    out = directory / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    sections, summary = ['# Cluster report', ''], {}
    for head in heads:
        _plot_sizes(out / f'sizes_{head.name}.png', head)
        if head.mean_profiles is not None:
            _plot_profiles(out / f'profiles_{head.name}.png', head, reaction_types)
        sheet = _write_contact_sheet(out, head, image_bytes)
        sections += _head_section(head, reaction_types, sheet)
        summary[head.name] = {
            'k': head.k, 'members': int(head.sizes.sum()), 'empty': int((head.sizes == 0).sum()),
            'largest_share': float(head.sizes.max() / max(head.sizes.sum(), 1)),
            'listed': len(listed_clusters(head)), 'agreement': head.agreement}
        if sheet is not None:
            summary[head.name]['examples'] = {'drawn': sheet.drawn,
                                              'undecodable': sheet.undecodable}
    artifacts.atomic_write_text(out / 'report.md', '\n'.join(sections) + '\n')
    artifacts.atomic_write_json(out / 'report.json', summary)
    return summary


def listed_clusters(head: HeadSummary) -> np.ndarray:
    """The clusters shown row by row (tables, contact sheet): the largest, largest first."""
    return np.argsort(-head.sizes, kind='stable')[:CLUSTERS_LISTED]


def _members_noun(head: HeadSummary) -> str:
    """What a cluster's members are: a reaction head clusters posts, by their reactions."""
    return 'comments' if head.kind == labels.COMMENTS else 'posts with reactions'


def _head_section(head: HeadSummary, reaction_types: Sequence[str],
                  sheet: ContactSheet | None) -> list[str]:
    total = max(int(head.sizes.sum()), 1)
    lines = [f'## {head.name}', '',
             f'{head.k} clusters over {total} {_members_noun(head)}; '
             f'largest {head.sizes.max() / total:.1%}, smallest {head.sizes.min() / total:.2%}, '
             f'empty {(head.sizes == 0).sum()}.', '',
             f'![sizes](sizes_{head.name}.png)', '']
    for factor, scores in head.agreement.items():
        lines.append(f"Agreement with the latent {factor}: NMI {scores['nmi']:.3f}, "
                     f"purity {scores['purity']:.3f}.")
    if head.agreement:
        lines.append('')
    largest = listed_clusters(head)
    if head.nearest_texts is not None:
        lines += _nearest_texts_table(head, largest)
    if head.mean_profiles is not None:
        lines += [f'![profiles](profiles_{head.name}.png)', '',
                  '| cluster | size | ' + ' | '.join(reaction_types) + ' |',
                  '| --- ' * (len(reaction_types) + 2) + '|']
        lines += [f'| {c} | {head.sizes[c]} | '
                  + ' | '.join(f'{p:.0%}' for p in head.mean_profiles[c][:len(reaction_types)])
                  + ' |' for c in largest] + ['']
    lines += _truncation_note(head, largest)
    if sheet is not None:
        lines += _contact_sheet_lines(head, sheet)
    return lines


def _nearest_texts_table(head: HeadSummary, largest: np.ndarray) -> list[str]:
    shown = max((len(head.nearest_texts[c]) for c in largest), default=0)
    lines = [f'| cluster | size | up to {shown} comments nearest the centroid |',
             '| --- | --- | --- |']
    lines += [f'| {c} | {head.sizes[c]} | {_cell(head.nearest_texts[c])} |' for c in largest]
    cut = sum(len(_one_line(t)) > TEXT_CUT for c in largest for t in head.nearest_texts[c])
    if cut:
        lines += ['', f'{cut} of these comments are cut to {TEXT_CUT} characters (...); '
                  f'{_record_link(head)} has them whole.']
    return lines + ['']


def _truncation_note(head: HeadSummary, largest: np.ndarray) -> list[str]:
    """Says which clusters the tables and the contact sheet leave out, when they leave any."""
    if len(largest) >= head.k:
        return []
    shown, total = int(head.sizes[largest].sum()), max(int(head.sizes.sum()), 1)
    return [f'Listed: the {len(largest)} largest of {head.k} clusters, holding {shown:,} of '
            f'{total:,} {_members_noun(head)} ({shown / total:.1%}). Every cluster is in the '
            f'sizes plot and in {_record_link(head)}.', '']


def _record_link(head: HeadSummary) -> str:
    return f'[heads/{head.name}.json](../heads/{head.name}.json)'


def _contact_sheet_lines(head: HeadSummary, sheet: ContactSheet) -> list[str]:
    chosen = ('the posts of the comments nearest the centroid' if head.kind == labels.COMMENTS
              else 'the posts nearest the centroid')
    rows = f'each of the {sheet.rows} largest clusters' if sheet.rows < head.k else 'each cluster'
    lines = [f'![examples]({sheet.file})', '',
             f'Example images: up to {sheet.columns} per cluster, {chosen}; one row for {rows}, '
             'largest first as in the table.']
    if sheet.undecodable:
        lines.append(f'{sheet.undecodable} of the {sheet.drawn} images could not be decoded: '
                     f'grey squares.')
    return lines + ['']


def _one_line(text: str) -> str:
    return ' '.join(text.split()).replace('|', '\\|')


def _cell(texts: list[str]) -> str:
    """Markdown-table-safe, one line per comment, each shortened."""
    def clean(text: str) -> str:
        text = _one_line(text)
        return text if len(text) <= TEXT_CUT else text[:TEXT_CUT - 3] + '...'
    return '<br>'.join(clean(t) for t in texts) or '(empty)'


class ContactSheet(NamedTuple):
    """What a head's contact sheet shows, for the report's text."""

    file: str           # its name in the report directory
    rows: int           # clusters, largest first
    columns: int        # example images per row, at most
    drawn: int          # images drawn, placeholders included
    undecodable: int    # of which placeholders


def _write_contact_sheet(out: Path, head: HeadSummary,
                         image_bytes: Callable[[int], bytes] | None) -> ContactSheet | None:
    """examples_<head>.png, or None without a way to read images or recorded example posts."""
    if image_bytes is None or head.example_posts is None:
        return None
    clusters = listed_clusters(head)
    sheet, drawn, undecodable = contact_sheet(head, clusters, image_bytes)
    name = f'examples_{head.name}.png'
    with artifacts.atomic_path(out / name) as tmp:
        sheet.save(tmp, format='PNG')
    return ContactSheet(name, len(clusters), EXAMPLES_PER_CLUSTER, drawn, undecodable)


def sheet_size(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) of a contact sheet in pixels."""
    return LABEL_WIDTH + columns * (THUMB + GAP), TITLE_HEIGHT + rows * (THUMB + GAP)


def cell_origin(row: int, column: int) -> tuple[int, int]:
    """The top-left pixel of a contact sheet cell; an image smaller than THUMB is centred."""
    return LABEL_WIDTH + column * (THUMB + GAP), TITLE_HEIGHT + row * (THUMB + GAP)


def contact_sheet(head: HeadSummary, clusters: Sequence[int],
                  image_bytes: Callable[[int], bytes],
                  columns: int = EXAMPLES_PER_CLUSTER) -> tuple[Image.Image, int, int]:
    """(the sheet, images drawn, of which undecodable): one row per cluster, labelled with its
    id and size, its first `columns` example posts' images. Reads only those images."""
    font = ImageFont.load_default(size=10)
    sheet = Image.new('RGB', sheet_size(len(clusters), columns), 'white')
    draw = ImageDraw.Draw(sheet)
    listed = f'the {len(clusters)} largest of {head.k}' if len(clusters) < head.k else 'all'
    draw.text((GAP, 3), f'{head.name}: example posts of {listed} clusters', fill='black',
              font=font)
    noun = 'comments' if head.kind == labels.COMMENTS else 'posts'
    drawn = undecodable = 0
    for row, cluster in enumerate(clusters):
        label = f'cluster {cluster}\n{int(head.sizes[cluster]):,} {noun}'
        draw.text((GAP, cell_origin(row, 0)[1] + 2), label, fill='black', font=font)
        for column, post in enumerate(head.example_posts[cluster][:columns]):
            tile = thumbnail(image_bytes(int(post)))
            if tile is None:
                tile, undecodable = placeholder(), undecodable + 1
            left, top = cell_origin(row, column)
            sheet.paste(tile, (left + (THUMB - tile.width) // 2, top + (THUMB - tile.height) // 2))
            drawn += 1
    return sheet, drawn, undecodable


def thumbnail(data: bytes) -> Image.Image | None:
    """The upright image fitted inside THUMB x THUMB; None when it cannot be decoded."""
    try:
        with images.open_image(data, MAX_PIXELS) as opened:
            # A JPEG decodes at the largest reduction still covering a cell: cheap on big photos.
            rgb, _ = opened.decode(opened.draft_scale_for(THUMB, THUMB))
            # A new image: the decoded pixels may be the opened one's, closed on return.
            return ImageOps.contain(rgb, (THUMB, THUMB))
    except images.DECODE_ERRORS:
        return None


def placeholder() -> Image.Image:
    """What stands in a cell for an image that cannot be decoded: a grey square, crossed."""
    tile = Image.new('RGB', (THUMB, THUMB), PLACEHOLDER_GREY)
    draw = ImageDraw.Draw(tile)
    draw.line((0, 0, THUMB - 1, THUMB - 1), fill='white')
    draw.line((0, THUMB - 1, THUMB - 1, 0), fill='white')
    return tile


def _plot_sizes(path: Path, head: HeadSummary) -> None:
    sizes = np.sort(head.sizes)[::-1]
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    ax.bar(np.arange(len(sizes)), sizes, width=1.0, color='#4477aa')
    ax.set_xlabel('cluster (largest first)')
    ax.set_ylabel(f'{head.kind} per cluster')
    ax.set_title(f'{head.name}: cluster sizes')
    if sizes.max() > 20 * max(sizes.min(), 1):
        ax.set_yscale('log')
    _save(fig, path)


def _plot_profiles(path: Path, head: HeadSummary, reaction_types: Sequence[str]) -> None:
    profiles = head.mean_profiles[:, :len(reaction_types)]
    order = np.argsort(-head.sizes, kind='stable')
    fig, ax = plt.subplots(figsize=(6, 0.3 * head.k + 1.5), dpi=100)
    image = ax.imshow(profiles[order], aspect='auto', cmap='viridis', vmin=0, vmax=1)
    ax.set_xticks(range(len(reaction_types)), reaction_types)
    ax.set_yticks(range(head.k), [f'{c} ({head.sizes[c]})' for c in order])
    ax.set_title(f'{head.name}: mean reaction profile per cluster')
    fig.colorbar(image, ax=ax, label='share of reactions')
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format='png')
    plt.close(fig)
