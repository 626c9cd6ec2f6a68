"""The results of the linear probes: JSON, a Markdown table and a grouped bar chart.

results.json holds everything (see `linear_eval`); results.md has one row per export and one
column per task metric (in percent), headed with the task's kind when its tasks.json gives one,
then the chosen C of each probe and its validation score; results.png shows the same metrics as
grouped bars, one bar per export. Every file is written atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use('Agg')

import matplotlib.pyplot as plt  # noqa: E402

from vise_jax import artifacts  # noqa: E402
from vise_jax.evaluate.probe import METRIC_TITLES  # noqa: E402

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'
RESULTS_PNG = 'results.png'


def task_title(task: str, info: Mapping[str, Any]) -> str:
    kind = info.get('kind')
    return f'{task} ({kind})' if kind else task


def metric_columns(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(task, metric) in the table's column order."""
    return [(task, metric) for task, info in results['tasks'].items()
            for metric in info['metrics']]


def percent(value: float | None) -> str:
    return '-' if value is None else f'{100 * value:.1f}'


def markdown_table(results: Mapping[str, Any]) -> str:
    columns = metric_columns(results)
    tasks = results['tasks']
    header = ['export'] + [f'{task_title(t, tasks[t])} {METRIC_TITLES.get(m, m)}'
                           for t, m in columns]
    lines = ['| ' + ' | '.join(header) + ' |',
             '| --- |' + ' ---: |' * len(columns)]
    for name, by_task in results['results'].items():
        cells = [percent(by_task[t]['metrics'][m]) for t, m in columns]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def choices_table(results: Mapping[str, Any]) -> str:
    tasks = list(results['tasks'])
    lines = ['| export | ' + ' | '.join(tasks) + ' |', '| --- |' + ' ---: |' * len(tasks)]
    for name, by_task in results['results'].items():
        cells = []
        for task in tasks:
            probe = by_task[task]
            cell = f'C={probe["c"]:g}'
            if probe['val_score'] is not None:
                cell += f' (val {METRIC_TITLES[probe["val_metric"]]} '
                cell += f'{percent(probe["val_score"])})'
            if not probe['converged']:
                cell += ' not converged'
            cells.append(cell)
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _dataset_line(split: str, info: Mapping[str, Any]) -> str:
    line = f'- {split}: `{info["description"]}`, {info["num_examples"]} images'
    bad = info.get('bad_images') or {}
    if bad:
        listed = ', '.join(f'{reason} {n}' for reason, n in bad.items())
        line += f'; {sum(bad.values())} unusable and left out ({listed})'
    return line


def markdown_report(results: Mapping[str, Any]) -> str:
    probe = results['probe']
    parts = [
        '# Linear evaluation', '',
        _dataset_line('train', results['train']),
        _dataset_line('test', results['test']), '',
        'Probe: features standardised on the train set, logistic regression (one-vs-rest for '
        f'multi-label tasks), C from {list(probe["inverse_regularization"])} chosen on '
        f'{probe["val_fraction"]:.0%} of the train set, refitted on all of it; scores in '
        'percent on the test set.', '',
        markdown_table(results), '',
        '## Chosen regularisation', '',
        choices_table(results), '',
        '## Exports', '',
    ]
    for name, info in results['exports'].items():
        parts.append(f'- {name}: {info.get("architecture")} width {info.get("width")}, '
                     f'{info.get("feature_dim")}-d features at '
                     f'{info.get("eval_image_size")} px, '
                     f'`{info["path"]}`')
    return '\n'.join(parts) + '\n'


def bar_chart_png(results: Mapping[str, Any]) -> bytes:
    columns = metric_columns(results)
    exports = list(results['results'])
    tasks = results['tasks']
    figure, axes = plt.subplots(figsize=(max(5.0, 1.2 * len(columns) * max(1, len(exports)) / 2
                                             + 2), 4.0))
    width = 0.8 / max(1, len(exports))
    for i, name in enumerate(exports):
        values = [100 * results['results'][name][t]['metrics'][m] for t, m in columns]
        positions = [c + (i - (len(exports) - 1) / 2) * width for c in range(len(columns))]
        bars = axes.bar(positions, values, width, label=name)
        axes.bar_label(bars, fmt='%.1f', fontsize=7, padding=1)
    axes.set_xticks(range(len(columns)))
    axes.set_xticklabels([f'{task_title(t, tasks[t])}\n{METRIC_TITLES.get(m, m)}'
                          for t, m in columns], fontsize=8)
    axes.set_ylabel('test score (%)')
    axes.set_ylim(0, 105)
    axes.set_title('Linear probes')
    axes.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes results.json, results.md and results.png into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    paths = {'json': out_dir / RESULTS_JSON, 'markdown': out_dir / RESULTS_MD,
             'chart': out_dir / RESULTS_PNG}
    artifacts.atomic_write_json(paths['json'], results)
    artifacts.atomic_write_text(paths['markdown'], markdown_report(results))
    artifacts.atomic_write_bytes(paths['chart'], bar_chart_png(results))
    return paths
