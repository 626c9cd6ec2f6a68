"""Training curves as one PNG: per head, loss and top-1 against step, train and eval."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402

from vise_jax import artifacts  # noqa: E402
from vise_jax.train.metrics import read_metrics  # noqa: E402


def _series(records, split: str, name: str) -> tuple[list[int], list[float]]:
    points = [(r['step'], r[name]) for r in records
              if r['split'] == split and r.get(name) is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike,
                heads: list[str]) -> Path:
    """Writes the curves of `heads` from a metrics.jsonl; returns the PNG's path."""
    records = read_metrics(metrics_path)
    figure, axes = plt.subplots(2, len(heads), figsize=(4 * len(heads), 6), squeeze=False)
    for column, head in enumerate(heads):
        for row, metric in enumerate(('loss', 'top1')):
            axis = axes[row, column]
            for split, style in (('train', '-'), ('eval', 'o--')):
                steps, values = _series(records, split, f'{head}/{metric}')
                if steps:
                    axis.plot(steps, values, style, label=split)
            axis.set_title(f'{head} {metric}')
            axis.set_xlabel('step')
            axis.grid(alpha=0.3)
            axis.legend()
    figure.tight_layout()
    out_path = Path(out_path)
    with artifacts.atomic_path(out_path) as tmp:
        figure.savefig(tmp, format='png', dpi=100)
    plt.close(figure)
    return out_path
