"""The cluster report: what each cluster holds, for a person to read.

Per head: cluster sizes (table and PNG), for comment heads the comments nearest each centroid,
for reaction heads the mean reaction profile per cluster (table and heatmap PNG), and, where
ground truth exists (the demo world's latents), how well the clusters recover it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use('Agg')  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics  # noqa: E402

from vise_jax import artifacts  # noqa: E402

REPORT_DIR = 'report'
CLUSTERS_LISTED = 50  # the largest clusters get a row each; the sizes plot shows all


@dataclasses.dataclass
class HeadSummary:
    name: str
    kind: str
    k: int
    sizes: np.ndarray                                 # (k,) members per cluster
    nearest_texts: list[list[str]] | None = None      # comments nearest each centroid
    mean_profiles: np.ndarray | None = None           # (k, reaction types) mean distribution
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


def agreement(cluster_ids: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """How well clusters recover a known factor: NMI, and purity (majority class share)."""
    contingency = metrics.cluster.contingency_matrix(truth, cluster_ids)
    return {
        'nmi': float(metrics.normalized_mutual_info_score(truth, cluster_ids)),
        'purity': float(contingency.max(axis=0).sum() / contingency.sum()),
    }


def write_report(directory: Path, heads: Sequence[HeadSummary],
                 reaction_types: Sequence[str]) -> dict[str, Any]:
    """Writes report.md, one PNG per plot, and report.json; returns the JSON summary."""
    out = directory / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    sections, summary = ['# Cluster report', ''], {}
    for head in heads:
        _plot_sizes(out / f'sizes_{head.name}.png', head)
        sections += _head_section(head, reaction_types)
        if head.mean_profiles is not None:
            _plot_profiles(out / f'profiles_{head.name}.png', head, reaction_types)
        summary[head.name] = {
            'k': head.k, 'members': int(head.sizes.sum()), 'empty': int((head.sizes == 0).sum()),
            'largest_share': float(head.sizes.max() / max(head.sizes.sum(), 1)),
            'agreement': head.agreement}
    artifacts.atomic_write_text(out / 'report.md', '\n'.join(sections) + '\n')
    artifacts.atomic_write_json(out / 'report.json', summary)
    return summary


def _head_section(head: HeadSummary, reaction_types: Sequence[str]) -> list[str]:
    total = max(int(head.sizes.sum()), 1)
    lines = [f'## {head.name}', '',
             f'{head.k} clusters over {total} {head.kind}; '
             f'largest {head.sizes.max() / total:.1%}, smallest {head.sizes.min() / total:.2%}, '
             f'empty {(head.sizes == 0).sum()}.', '',
             f'![sizes](sizes_{head.name}.png)', '']
    for factor, scores in head.agreement.items():
        lines.append(f"Agreement with the latent {factor}: NMI {scores['nmi']:.3f}, "
                     f"purity {scores['purity']:.3f}.")
    if head.agreement:
        lines.append('')
    largest = np.argsort(-head.sizes, kind='stable')[:CLUSTERS_LISTED]
    if head.nearest_texts is not None:
        lines += ['| cluster | size | comments nearest the centroid |', '| --- | --- | --- |']
        lines += [f'| {c} | {head.sizes[c]} | {_cell(head.nearest_texts[c])} |' for c in largest]
    if head.mean_profiles is not None:
        lines += [f'![profiles](profiles_{head.name}.png)', '',
                  '| cluster | size | ' + ' | '.join(reaction_types) + ' |',
                  '| --- ' * (len(reaction_types) + 2) + '|']
        lines += [f'| {c} | {head.sizes[c]} | '
                  + ' | '.join(f'{p:.0%}' for p in head.mean_profiles[c][:len(reaction_types)])
                  + ' |' for c in largest]
    return lines + ['']


def _cell(texts: list[str]) -> str:
    """Markdown-table-safe, one line per comment, each shortened."""
    def clean(text: str) -> str:
        text = ' '.join(text.split()).replace('|', '\\|')
        return text if len(text) <= 80 else text[:77] + '...'
    return '<br>'.join(clean(t) for t in texts) or '(empty)'


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
